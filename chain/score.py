"""Score: the LightGBM LambdaRank blender, or, when it is out, the single-source rung."""

from __future__ import annotations

import numpy as np

from chain.types import Candidates
from models.blender import Blender
from models.features import SOURCES

# When a source is asked to rank alone (the blender failed), the one that ranks best offline goes first.
SINGLE_SOURCE_PRIORITY = ("history", "cf", "content", "popularity")


class BlendStage:
    def __init__(self, model: Blender) -> None:
        self.model = model

    def score(self, x: np.ndarray) -> np.ndarray:
        """x: float32 (n, len(BLENDER_FEATURES)) → float32 (n,) relevance, comparable within one request."""
        return self.model.predict(x).astype(np.float32)


def single_source(cands: Candidates) -> tuple[np.ndarray, str] | None:
    """The best source that proposed anything ranks alone: its items by its rank, then every other candidate by
    its best rank in any source. Scores are minus the position in that order, so they fall down the list."""
    for source in SINGLE_SOURCE_PRIORITY:
        ranks = cands.ranks[:, SOURCES.index(source)]
        if np.any(~np.isnan(ranks)):
            n = np.nanmax(ranks)
            others = n + np.nanmin(np.where(np.isnan(cands.ranks), np.inf, cands.ranks), axis=1)
            return -np.where(np.isnan(ranks), others, ranks).astype(np.float32), source
    return None
