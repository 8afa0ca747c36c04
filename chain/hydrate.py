"""Hydrate: the blender's feature rows for the candidates, in BLENDER_FEATURES order (models/features.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chain.types import Candidates, Context
from models.features import assemble
from models.snapshot import Snapshot


@dataclass(frozen=True)
class Hydrated:
    x: np.ndarray  # float32 (len(candidates), len(BLENDER_FEATURES))
    ui_times_bought: np.ndarray  # float (len(candidates),)


def hydrate(cands: Candidates, ctx: Context, snapshot: Snapshot, item_matrix: np.ndarray) -> Hydrated:
    """Source, item, user and user-item features; `item_matrix` is ITEM_FEATURES for every catalog item (the
    store's copy online, the bundle's offline: the same values)."""
    times, last = snapshot.ui_features(ctx.row, cands.items)
    return Hydrated(assemble(cands, ctx.numeric, item_matrix, times, last), times)
