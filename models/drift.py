"""Drift's reference and math: what the blender's inputs looked like at training, and how far serving's are from it.

The bundle stores, in `drift_reference.json` (listed in the manifest with its sha256, so covered by its hashes):
- per numeric feature the blender uses, quantile bin edges over the reference traffic and each bin's share, plus
  one bin for missing values (NaN: LightGBM's "missing");
- per categorical feature, each category's share: `user_country` (the 12 most frequent, the rest as `OTHER`), and
  the request mix, `request_known_user` (the bundle knows the user or not) and `request_query` (a search query or
  not).

The reference traffic is the validation window [validation_start, cutoff) replayed against the validation snapshot:
one request per invoice, in the same relation to its snapshot as a holdout request is to the served bundle's. Each
request weighs 1: its user features count once, and each candidate-level feature (source, item, user-item) counts
its candidates' histogram normalised to sum 1, so a request with 300 candidates weighs what one with 50 does.

No raw rows are stored (evidently#506 is what storing them cost others): the reference IS a binned distribution, so
the report (pipeline/commands/drift.py) hands Evidently that representation: each logged value as its reference bin's
label (`bin_labels`, `labels_of`) and the reference as a frame of labels whose counts reproduce the stored shares
(`reference_counts`). Ray-free, as all of models/.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import BundleIntegrityError
from models.features import BLENDER_FEATURES, USER_NUMERIC_FEATURES

DRIFT_FILE = "drift_reference.json"
FORMAT = 1
N_BINS = 10  # quantile bins per numeric feature (deciles), before ties merge them; plus the missing bin
MAX_COUNTRIES = 12
OTHER = "__other__"
# Proportions are floored at this before PSI's log, as Evidently's get_binned_data does (0.0001), so an empty bin
# costs a bounded amount instead of infinity.
EPS = 1e-4
# The data has no search log: the share of requests with a query is declared, the load generator's
# (loadtests/traffic.py QUERY_SHARE uses this value).
EXPECTED_QUERY_SHARE = 0.05

USER_COLUMNS: tuple[str, ...] = USER_NUMERIC_FEATURES  # one value per request (Context.numeric order)
CANDIDATE_COLUMNS: tuple[str, ...] = tuple(f for f in BLENDER_FEATURES if f not in USER_NUMERIC_FEATURES)
CANDIDATE_INDEX = np.array([BLENDER_FEATURES.index(f) for f in CANDIDATE_COLUMNS], dtype=np.int64)
CATEGORICAL_COLUMNS: tuple[str, ...] = ("user_country", "request_known_user", "request_query")
NUMERIC_COLUMNS: tuple[str, ...] = USER_COLUMNS + CANDIDATE_COLUMNS
FEATURES: tuple[str, ...] = NUMERIC_COLUMNS + CATEGORICAL_COLUMNS


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = EPS) -> float:
    """Population stability index of two distributions over the same bins (each float (n_bins,), summing to 1):
    sum((a - e) * ln(a / e)), each proportion floored at `eps` first.

    Source: Siddiqi, "Credit Risk Scorecards" (Wiley, 2006), ch. 8; its properties in Yurdakul, "Statistical
    Properties of the Population Stability Index" (2018). Symmetric, >= 0; the usual cuts are 0.1 and 0.25.
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), eps)
    a = np.maximum(np.asarray(actual, dtype=np.float64), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2 (0 identical, 1 disjoint), of two distributions over the same bins (each
    float (n_bins,), summing to 1; empty bins allowed): the square root of the JS divergence
    0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2, with 0 log 0 = 0.

    Source: Lin, "Divergence measures based on the Shannon entropy", IEEE Trans. Inf. Theory 37(1), 1991; its root
    is a metric: Endres & Schindelin, IEEE Trans. Inf. Theory 49(7), 2003. Equal to
    scipy.spatial.distance.jensenshannon(p, q, base=2).
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kq = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(np.sqrt(max(0.5 * (kp + kq), 0.0)))


@dataclass(frozen=True)
class NumericBins:
    """One numeric feature's reference: finite, increasing `edges` (k,) cut the line into k + 1 bins (a value v
    falls in bin searchsorted(edges, v, "right")), then one bin for NaN; `probs` (k + 2,) sums to 1."""

    edges: np.ndarray
    probs: np.ndarray

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        """int64 bin per value (any shape)."""
        v = np.asarray(values, dtype=np.float64)
        idx = np.searchsorted(self.edges, v, side="right")
        return np.where(np.isnan(v), len(self.edges) + 1, idx)

    @property
    def n_bins(self) -> int:
        return len(self.edges) + 2


@dataclass(frozen=True)
class Categories:
    """One categorical feature's reference: `categories` and their shares `probs`, the same length, summing to 1.
    A value outside the list counts as OTHER when OTHER is listed, else it is not counted."""

    categories: tuple[str, ...]
    probs: np.ndarray

    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.categories)}


@dataclass(frozen=True)
class Reference:
    """The bundle's reference distributions, and what they were computed from (`source`: period, requests)."""

    numeric: dict[str, NumericBins]
    categorical: dict[str, Categories]
    source: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "numeric": {k: {"edges": b.edges.tolist(), "probs": b.probs.tolist()} for k, b in self.numeric.items()},
            "categorical": {
                k: {"categories": list(c.categories), "probs": c.probs.tolist()} for k, c in self.categorical.items()
            },
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Reference:
        if raw.get("format") != FORMAT:
            raise BundleIntegrityError(f"{DRIFT_FILE} has format {raw.get('format')!r}, this code reads {FORMAT}")
        return cls(
            {
                k: NumericBins(np.asarray(v["edges"], float), np.asarray(v["probs"], float))
                for k, v in raw["numeric"].items()
            },
            {
                k: Categories(tuple(v["categories"]), np.asarray(v["probs"], float))
                for k, v in raw["categorical"].items()
            },
            raw.get("source", {}),
        )

    def save(self, directory: Path) -> list[str]:
        (directory / DRIFT_FILE).write_text(json.dumps(self.as_json(), indent=1) + "\n")
        return [DRIFT_FILE]


def load_reference(directory: Path, files: dict[str, str]) -> Reference | None:
    """The bundle's reference, or None for a bundle trained before drift existed (its manifest does not list the
    file). The file's hash is checked with every other file's by models.bundle.verify before this runs."""
    if DRIFT_FILE not in files:
        return None
    try:
        return Reference.from_json(json.loads((directory / DRIFT_FILE).read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleIntegrityError(f"{directory / DRIFT_FILE} is not a drift reference ({exc}): retrain") from exc


@dataclass(frozen=True)
class RequestFeatures:
    """What drift counts of one request: `user` float32 (len(USER_COLUMNS),), `candidates` float32
    (n, len(CANDIDATE_COLUMNS)) (n may be 0), and the categorical values."""

    user: np.ndarray
    candidates: np.ndarray
    country: str
    known: bool
    query: bool

    def categories(self) -> tuple[str, str, str]:
        """user_country, request_known_user, request_query, as their category strings."""
        return self.country, "known" if self.known else "new", "query" if self.query else "none"


def weighted_quantile_edges(values: np.ndarray, weights: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """The (1/n_bins, ..., (n_bins-1)/n_bins) weighted quantiles of the finite values, deduplicated (ties at a point
    mass merge bins): float64 (<= n_bins - 1,). Empty for no finite value."""
    ok = np.isfinite(values)
    v, w = values[ok].astype(np.float64), weights[ok].astype(np.float64)
    if not v.size or w.sum() <= 0:
        return np.empty(0)
    order = np.argsort(v, kind="stable")
    v, cw = v[order], np.cumsum(w[order])
    targets = cw[-1] * np.arange(1, n_bins) / n_bins
    return np.unique(v[np.minimum(np.searchsorted(cw, targets, side="left"), v.size - 1)])


def build_reference(
    requests: Iterable[tuple[RequestFeatures, float]],
    query_share: float = EXPECTED_QUERY_SHARE,
    source: dict[str, Any] | None = None,
) -> Reference:
    """The reference of weighted requests (a request's weight: how many times it was made). `query_share`
    replaces the requests' own query mix, since the data has none (EXPECTED_QUERY_SHARE). Raises ValueError for no
    requests."""
    reqs = list(requests)
    if not reqs:
        raise ValueError("no reference requests: the validation window holds no invoices")
    w = np.array([wt for _, wt in reqs], dtype=np.float64)
    user = np.stack([r.user for r, _ in reqs]).astype(np.float64)
    cand_rows = [r.candidates for r, _ in reqs]
    sizes = np.array([c.shape[0] for c in cand_rows])
    cands = np.vstack([c for c in cand_rows if c.shape[0]]) if sizes.sum() else np.empty((0, len(CANDIDATE_COLUMNS)))
    cand_w = np.repeat(np.divide(w, sizes, out=np.zeros_like(w), where=sizes > 0), sizes)
    numeric: dict[str, NumericBins] = {}
    for name, col, weights in [
        *((n, user[:, j], w) for j, n in enumerate(USER_COLUMNS)),
        *((n, cands[:, j].astype(np.float64), cand_w) for j, n in enumerate(CANDIDATE_COLUMNS)),
    ]:
        edges = weighted_quantile_edges(col, weights)
        bins = NumericBins(edges, np.zeros(len(edges) + 2))
        counts = np.bincount(bins.bin_of(col), weights=weights, minlength=bins.n_bins)
        numeric[name] = NumericBins(edges, counts / counts.sum())
    cats = [r.categories() for r, _ in reqs]
    countries: dict[str, float] = {}
    for (c, _, _), wt in zip(cats, w, strict=True):
        countries[c] = countries.get(c, 0.0) + wt
    top = sorted(countries, key=lambda c: (-countries[c], c))[:MAX_COUNTRIES]
    other = sum(v for c, v in countries.items() if c not in top)
    total = w.sum()
    known = sum(wt for (_, k, _), wt in zip(cats, w, strict=True) if k == "known") / total
    categorical = {
        "user_country": Categories((*top, OTHER), np.array([countries[c] for c in top] + [other]) / total),
        "request_known_user": Categories(("known", "new"), np.array([known, 1.0 - known])),
        "request_query": Categories(("query", "none"), np.array([query_share, 1.0 - query_share])),
    }
    return Reference(numeric, categorical, {**(source or {}), "requests": float(total)})


MISSING = "missing"  # the label of a numeric feature's NaN bin


def bin_labels(bins: NumericBins) -> list[str]:
    """A label per bin of `bins` (n_bins,): "00 (-inf, e0)", "01 [e0, e1)", ..., "k [e(k-1), inf)", then MISSING.
    The index prefix keeps labels distinct and in order whatever the edges' rounding."""
    bounds = [-np.inf, *bins.edges.tolist(), np.inf]
    out = []
    for i in range(len(bounds) - 1):
        lo, hi = bounds[i], bounds[i + 1]
        out.append(f"{i:02d} {'(' if i == 0 else '['}{lo:.4g}, {hi:.4g})")
    return [*out, MISSING]


def feature_labels(ref: Reference, name: str) -> list[str]:
    """The labels of a feature's reference bins, in the order of its `probs`: bin labels or categories."""
    return bin_labels(ref.numeric[name]) if name in ref.numeric else list(ref.categorical[name].categories)


def labels_of(ref: Reference, name: str, values: np.ndarray) -> np.ndarray:
    """object (n,): each value's reference bin label, as DriftMonitor counts it (numeric: the bin of
    `NumericBins.bin_of`, NaN in MISSING; categorical: the category, an unlisted one as OTHER when OTHER is listed,
    else None, which the monitor does not count)."""
    labels = np.asarray(feature_labels(ref, name), dtype=object)
    if name in ref.numeric:
        return labels[ref.numeric[name].bin_of(np.asarray(values, dtype=np.float64))]
    listed = set(ref.categorical[name].categories)
    fallback = OTHER if OTHER in listed else None
    return np.array([v if v in listed else fallback for v in values], dtype=object)


def reference_counts(probs: np.ndarray, n: int) -> np.ndarray:
    """int64 counts summing to n whose shares are `probs` (normalised first) to within 1/n each: floor(p * n), then
    the remaining units to the largest remainders (Hamilton's method; Balinski & Young, "Fair Representation", Yale
    University Press, 1982, ch. 2). A zero share gets 0; ties go to the lower index."""
    p = np.asarray(probs, dtype=np.float64)
    quota = p / p.sum() * n
    counts = np.floor(quota).astype(np.int64)
    left = n - int(counts.sum())
    if left:
        order = np.argsort(-(quota - counts), kind="stable")
        counts[order[:left]] += 1
    return counts
