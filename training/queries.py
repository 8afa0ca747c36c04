"""Product queries written from the catalog's own vocabulary: each matches 2-27 descriptions word for word, except
"blue vintage mug" (none: the encoder must get the meaning). The query bar (`recserve evaluate`) asks them for
sampled holdout users; the load tests send them with 5% of /recommend calls. No heavy imports: locust loads it."""

PRODUCT_QUERIES: tuple[str, ...] = (
    "blue vintage mug",
    "christmas decoration",
    "heart t-light holder",
    "lunch bag",
    "cake stand",
    "wall clock",
    "paper napkins",
    "jam jar",
    "doormat",
    "party bunting",
)
