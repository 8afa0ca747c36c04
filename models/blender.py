"""Blender: a LightGBM LambdaRank model over the merged candidates, one query group per user."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np

from models.errors import BundleIntegrityError, SchemaMismatchError
from models.features import BLENDER_FEATURES
from models.settings import BlenderSettings

BLENDER_FILE = "blender.txt"


class Blender:
    def __init__(self, booster: lgb.Booster, num_threads: int = 1) -> None:
        names = tuple(booster.feature_name())
        if names != BLENDER_FEATURES:
            raise SchemaMismatchError(
                f"blender was trained on features {list(names)} but this code computes "
                f"{list(BLENDER_FEATURES)}: retrain the bundle with this version"
            )
        self.booster = booster
        self.num_threads = num_threads

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        groups: np.ndarray,
        settings: BlenderSettings,
        seed: int,
        num_threads: int,
    ) -> tuple[Blender, dict[str, float]]:
        """Fit on query groups (sizes in `groups`, rows in group order); the last valid_fraction of groups
        stops the boosting early. Returns the model and its validation NDCG@10."""
        rng = np.random.default_rng(seed)
        n_groups = groups.shape[0]
        is_valid = np.zeros(n_groups, dtype=bool)
        is_valid[rng.choice(n_groups, size=max(1, int(n_groups * settings.valid_fraction)), replace=False)] = True
        row_valid = np.repeat(is_valid, groups)
        params = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [10],
            "num_leaves": settings.num_leaves,
            "learning_rate": settings.learning_rate,
            "min_data_in_leaf": settings.min_data_in_leaf,
            "feature_fraction": settings.feature_fraction,
            "lambdarank_truncation_level": 20,
            "num_threads": num_threads,
            "seed": seed,
            "deterministic": True,
            "verbosity": -1,
        }
        train = lgb.Dataset(
            x[~row_valid], label=y[~row_valid], group=groups[~is_valid], feature_name=list(BLENDER_FEATURES)
        )
        valid = lgb.Dataset(x[row_valid], label=y[row_valid], group=groups[is_valid], reference=train)
        evals: dict[str, dict[str, list[float]]] = {}
        booster = lgb.train(
            params,
            train,
            num_boost_round=settings.n_estimators,
            valid_sets=[valid],
            valid_names=["valid"],
            callbacks=[
                lgb.early_stopping(settings.early_stopping_rounds, verbose=False),
                lgb.record_evaluation(evals),
            ],
        )
        best = booster.best_iteration or settings.n_estimators
        booster = booster if booster.best_iteration == 0 else _trim(booster, best)
        ndcg = evals["valid"]["ndcg@10"][best - 1]
        return cls(booster, num_threads=1), {"valid_ndcg@10": float(ndcg), "trees": float(best)}

    def predict(self, x: np.ndarray) -> np.ndarray:
        # Booster.predict directly: the sklearn wrapper costs about twice as much per call.
        return self.booster.predict(x, num_threads=self.num_threads)

    def importance(self) -> dict[str, float]:
        gain = self.booster.feature_importance(importance_type="gain")
        return dict(zip(BLENDER_FEATURES, (float(g) for g in gain), strict=True))

    def save(self, directory: Path) -> list[str]:
        self.booster.save_model(str(directory / BLENDER_FILE))
        return [BLENDER_FILE]

    @classmethod
    def load(cls, directory: Path, num_threads: int = 1) -> Blender:
        try:
            booster = lgb.Booster(model_file=str(directory / BLENDER_FILE))
        except lgb.basic.LightGBMError as exc:
            raise BundleIntegrityError(f"{directory / BLENDER_FILE} is not a LightGBM model ({exc}): retrain") from exc
        return cls(booster, num_threads=num_threads)


def _trim(booster: lgb.Booster, n_trees: int) -> lgb.Booster:
    """Keep only the best iteration's trees, so the saved file is the model that was validated."""
    return lgb.Booster(model_str=booster.model_to_string(num_iteration=n_trees))
