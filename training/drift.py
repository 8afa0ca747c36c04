"""The drift reference of a training run: the validation window's real traffic through the validation chain.

Each invoice in [validation_start, cutoff) is one request of its customer, answered by the chain over the validation
snapshot (as of validation_start), so a reference request stands to its snapshot as a holdout request stands to the
served bundle: a customer not yet seen is a new user, exactly as in serving. Without session events or a query a
user's request has the same features every time, so each customer is run once and weighs their invoice count.
"""

from __future__ import annotations

import pandas as pd

from chain.drift import request_features
from chain.offline import OfflineChain
from chain.types import Query
from models.data import window
from models.drift import Reference, build_reference


def invoices_by_user(interactions: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> pd.Series:
    """Distinct invoices per customer in [start, end): int (users,), indexed by user id (str), sorted by id."""
    rows = window(interactions, start, end)
    counts = rows.groupby("user_id", observed=True)["invoice"].nunique()
    counts.index = counts.index.astype(str)
    return counts[counts > 0].sort_index()


def drift_reference(
    chain: OfflineChain, interactions: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp
) -> Reference:
    """The reference distributions of the requests in [start, end) answered by `chain` (models/drift.py)."""
    counts = invoices_by_user(interactions, start, end)
    requests = []
    for user, n in counts.items():
        r = chain.retrieve(Query(str(user)))
        requests.append((request_features(r.context, chain.hydrate(r).x), float(n)))
    return build_reference(requests, source={"window": [str(start), str(end)], "users": len(counts)})
