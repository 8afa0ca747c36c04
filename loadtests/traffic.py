"""The load tests' traffic, read from the data: the bundle's holdout users and its catalog. Imports no torch or
Ray, so locust can load it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from settings import DATA_FILE, Settings
from training.queries import PRODUCT_QUERIES

QUERIES = PRODUCT_QUERIES
QUERY_SHARE = 0.05  # of /recommend calls


@dataclass(frozen=True)
class Traffic:
    users: list[str]  # bought before the bundle's cutoff and in the holdout window after it
    items: list[str]  # the bundle's catalog


def load(bundle: Path | None = None) -> Traffic:
    import pandas as pd

    from models.bundle import read_manifest
    from models.data import load_clean
    from models.split import holdout_truth, resolve_split

    bundle = bundle or Settings().latest_bundle()
    manifest = read_manifest(bundle)
    data = load_clean(DATA_FILE)
    split = resolve_split(data, manifest.cutoff.date(), manifest.settings.split)
    known = set(pd.read_parquet(bundle / "user_features.parquet")["user_id"].astype(str))
    items = pd.read_parquet(bundle / "catalog.parquet")["item_id"].astype(str).tolist()
    return Traffic(users=sorted(holdout_truth(data.interactions, split, known)), items=items)
