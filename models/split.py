"""The time-based split. Everything a model or feature sees for the test comes from before the cutoff.

    |---- history ----|-- validation (blender labels) --|cutoff|-- holdout (test truth) --|
                       ^ validation_start = cutoff - validation_days

The blender's base models are fitted on rows before validation_start and its labels are the purchases in
the validation window; the served models are then refitted on all rows before the cutoff.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pandas as pd

from models.data import CleanData, window
from models.errors import CutoffError
from models.settings import SplitSettings


@dataclass(frozen=True)
class Split:
    cutoff: pd.Timestamp
    validation_start: pd.Timestamp
    holdout_end: pd.Timestamp

    def as_dict(self) -> dict[str, str]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "validation_start": self.validation_start.isoformat(),
            "holdout_end": self.holdout_end.isoformat(),
        }


def default_cutoff(data: CleanData, settings: SplitSettings) -> pd.Timestamp:
    """Midnight of the day `holdout_days` before the last invoice."""
    return (data.last_ts - pd.Timedelta(days=settings.holdout_days)).normalize()


def cutoff_range(data: CleanData, settings: SplitSettings) -> tuple[pd.Timestamp, pd.Timestamp]:
    earliest = (data.first_ts + pd.Timedelta(days=settings.min_history_days + settings.validation_days)).normalize()
    earliest += pd.Timedelta(days=1)
    latest = (data.last_ts - pd.Timedelta(days=settings.min_holdout_days)).normalize()
    return earliest, latest


def resolve_split(data: CleanData, cutoff: dt.date | None, settings: SplitSettings) -> Split:
    earliest, latest = cutoff_range(data, settings)
    ts = default_cutoff(data, settings) if cutoff is None else pd.Timestamp(cutoff).normalize()
    if not earliest <= ts <= latest:
        raise CutoffError(
            f"--cutoff {ts.date()} is outside the data: it needs {settings.min_history_days + settings.validation_days}"
            f" days of history before it and {settings.min_holdout_days} after; choose a date between "
            f"{earliest.date()} and {latest.date()}"
        )
    return Split(
        cutoff=ts,
        validation_start=ts - pd.Timedelta(days=settings.validation_days),
        holdout_end=ts + pd.Timedelta(days=settings.holdout_days),
    )


def future_purchases(interactions: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> dict[str, set[str]]:
    """Per user, the distinct items bought in [start, end)."""
    rows = window(interactions, start, end)
    grouped = rows.groupby("user_id", observed=True)["item_id"].unique()
    return {str(u): {str(i) for i in items} for u, items in grouped.items()}


def holdout_truth(interactions: pd.DataFrame, split: Split, known_users: set[str]) -> dict[str, set[str]]:
    """Test users bought both before the cutoff (known_users) and in the holdout window."""
    after = future_purchases(interactions, split.cutoff, split.holdout_end)
    return {u: items for u, items in after.items() if u in known_users}
