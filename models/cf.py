"""Collaborative filtering: implicit ALS fitted on a weighted user x item matrix, scored with numpy.

Weighting. The raw signal is distinct invoices per (user, item). This data mixes retail shoppers with
wholesalers who buy hundreds of lines per invoice, and a few items (bags, holders) that everyone buys.
BM25 (per-item IDF times a per-user length norm) damps both, so the factors model taste rather than
volume; `weighting="log"` (1 + log counts) is the plainer alternative, and validation NDCG decides.

Fold-in. `fold_in_user` solves the same least-squares step ALS uses for a user (Hu et al. 2008), given
fixed item factors; a new user or a real-time event thus moves CF scores without retraining.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from models.errors import BundleIntegrityError
from models.settings import CFSettings

CF_FILE = "cf.npz"


class Weighting:
    """The confidence transform, with the statistics it needs stored so serving weighs like training."""

    def __init__(self, settings: CFSettings, idf: np.ndarray, avg_len: float) -> None:
        self.settings = settings
        self.idf = idf
        self.avg_len = avg_len

    @classmethod
    def fit(cls, counts: sp.csr_matrix, settings: CFSettings) -> Weighting:
        n_users = counts.shape[0]
        df = np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.float64)
        idf = np.maximum(np.log(n_users) - np.log1p(df), 0.0)
        row_sums = np.asarray(counts.sum(axis=1)).ravel()
        avg_len = float(row_sums.mean()) if row_sums.size else 1.0
        return cls(settings, idf, max(avg_len, 1e-9))

    def apply(self, items: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Confidence for one user's (items, counts); alpha included, as implicit applies it."""
        s = self.settings
        counts = counts.astype(np.float64)
        if s.weighting == "log":
            w = 1.0 + np.log1p(counts)
        else:
            length_norm = (1.0 - s.bm25_b) + s.bm25_b * counts.sum() / self.avg_len
            w = counts * (s.bm25_k1 + 1.0) / (s.bm25_k1 * length_norm + counts) * self.idf[items]
        return s.alpha * w

    def matrix(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        out = counts.astype(np.float64, copy=True)
        for u in range(out.shape[0]):
            lo, hi = out.indptr[u], out.indptr[u + 1]
            if hi > lo:
                out.data[lo:hi] = self.apply(out.indices[lo:hi], out.data[lo:hi])
        out.eliminate_zeros()
        return out


class ALSModel:
    def __init__(
        self,
        user_factors: np.ndarray,
        item_factors: np.ndarray,
        weighting: Weighting,
    ) -> None:
        self.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        self.weighting = weighting
        self.regularization = weighting.settings.regularization
        self._yty = self.item_factors.T.astype(np.float64) @ self.item_factors.astype(np.float64)
        self._xtx = self.user_factors.T.astype(np.float64) @ self.user_factors.astype(np.float64)

    @classmethod
    def fit(
        cls, counts: sp.csr_matrix, settings: CFSettings, seed: int, num_threads: int, show_progress: bool
    ) -> ALSModel:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        weighting = Weighting.fit(counts, settings)
        confidence = weighting.matrix(counts)
        # alpha is already inside the confidence, so implicit must not scale again.
        model = AlternatingLeastSquares(
            factors=settings.factors,
            regularization=settings.regularization,
            alpha=1.0,
            iterations=settings.iterations,
            random_state=seed,
            num_threads=num_threads,
        )
        # implicit warns (and slows) when OpenBLAS runs its own thread pool under ALS's threads.
        with threadpool_limits(1, "blas"):
            model.fit(confidence.astype(np.float32).tocsr(), show_progress=show_progress)
        return cls(model.user_factors, model.item_factors, weighting)

    @property
    def n_items(self) -> int:
        return int(self.item_factors.shape[0])

    def score(self, user_vector: np.ndarray) -> np.ndarray:
        return self.item_factors @ user_vector

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return self.user_factors[users] @ self.item_factors.T

    def _solve(self, gram: np.ndarray, factors: np.ndarray, idx: np.ndarray, conf: np.ndarray) -> np.ndarray:
        y = factors[idx].astype(np.float64)
        a = gram + self.regularization * np.eye(gram.shape[0]) + (y.T * (conf - 1.0)) @ y
        b = (conf[:, None] * y).sum(axis=0)
        return np.linalg.solve(a, b).astype(np.float32)

    def fold_in_user(self, items: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The user factor ALS would compute from these interactions, with item factors held fixed."""
        if items.size == 0:
            return np.zeros(self.item_factors.shape[1], dtype=np.float32)
        conf = self.weighting.apply(items, counts)
        keep = conf > 0
        return self._solve(self._yty, self.item_factors, items[keep], conf[keep])

    def save(self, directory: Path) -> list[str]:
        np.savez(
            directory / CF_FILE,
            user_factors=self.user_factors,
            item_factors=self.item_factors,
            idf=self.weighting.idf,
            avg_len=np.float64(self.weighting.avg_len),
        )
        return [CF_FILE]

    @classmethod
    def load(cls, directory: Path, settings: CFSettings) -> ALSModel:
        with np.load(directory / CF_FILE, allow_pickle=False) as z:
            missing = {"user_factors", "item_factors", "idf", "avg_len"} - set(z.files)
            if missing:
                raise BundleIntegrityError(f"{directory / CF_FILE} lacks arrays {sorted(missing)}: retrain")
            weighting = Weighting(settings, z["idf"], float(z["avg_len"]))
            return cls(z["user_factors"], z["item_factors"], weighting)
