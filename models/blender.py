"""Blender: a LightGBM LambdaRank model over the merged candidates, one query group per user."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from models.errors import BundleIntegrityError, SchemaMismatchError
from models.features import BLENDER_FEATURES
from models.settings import BlenderSettings

BLENDER_FILE = "blender.txt"
log = logging.getLogger("recserve")


class Blender:
    """The blender: fitted and saved with LightGBM; at load its trees are compiled to native code (lleaves), which
    scores the same rows to within 1e-15 about 7× faster (300 rows: 0.07 against 0.48 ms, one thread, 2-core VM).

    predict(x): x float (n, len(BLENDER_FEATURES)), NaN for a missing value; returns (n,) float64 relevance scores,
    comparable within one query only (LambdaRank)."""

    def __init__(self, booster: lgb.Booster, num_threads: int = 1, compiled: Any = None) -> None:
        names = tuple(booster.feature_name())
        if names != BLENDER_FEATURES:
            raise SchemaMismatchError(
                f"blender was trained on features {list(names)} but this code computes "
                f"{list(BLENDER_FEATURES)}: retrain the bundle with this version"
            )
        self.booster = booster
        self.num_threads = num_threads
        self.compiled = compiled

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
        if self.compiled is not None:
            return self.compiled.predict(x, n_jobs=self.num_threads)
        # Booster.predict directly: the sklearn wrapper costs about twice as much per call.
        return self.booster.predict(x, num_threads=self.num_threads)

    def importance(self) -> dict[str, float]:
        gain = self.booster.feature_importance(importance_type="gain")
        return dict(zip(BLENDER_FEATURES, (float(g) for g in gain), strict=True))

    def save(self, directory: Path) -> list[str]:
        self.booster.save_model(str(directory / BLENDER_FILE))
        return [BLENDER_FILE]

    @classmethod
    def load(
        cls, directory: Path, num_threads: int = 1, compile: bool = True, compile_cache: Path | None = None
    ) -> Blender:
        """`compile=False` scores with LightGBM itself (the reference the compiled trees are tested against);
        `compile_cache` is where compiled trees are kept (default: the temp dir; settings.Settings.compile_cache)."""
        try:
            booster = lgb.Booster(model_file=str(directory / BLENDER_FILE))
        except lgb.basic.LightGBMError as exc:
            raise BundleIntegrityError(f"{directory / BLENDER_FILE} is not a LightGBM model ({exc}): retrain") from exc
        compiled = compile_trees(directory / BLENDER_FILE, compile_cache) if compile else None
        return cls(booster, num_threads=num_threads, compiled=compiled)


def _trim(booster: lgb.Booster, n_trees: int) -> lgb.Booster:
    """Keep only the best iteration's trees, so the saved file is the model that was validated."""
    return lgb.Booster(model_str=booster.model_to_string(num_iteration=n_trees))


def compile_trees(model_file: Path, cache_dir: Path | None = None) -> Any:
    """The model's trees compiled to native code for this CPU by lleaves (LLVM), or None where lleaves cannot run
    (then LightGBM scores; a warning says so). Compiling takes about 2 s, so the object file is cached in
    <cache_dir>/recserve-lleaves/ (default: the temp dir) by the model's SHA-256 and the CPU, written atomically."""
    try:
        import lleaves
        from llvmlite import binding

        version = importlib.metadata.version("lleaves")
    except ImportError as exc:
        log.warning("lleaves is not importable (%s): the blender scores with LightGBM, about 7x slower", exc)
        return None
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()[:32]
    cpu = f"{platform.machine()}-{binding.get_host_cpu_name()}"
    cache = Path(cache_dir or tempfile.gettempdir()) / "recserve-lleaves"
    path = cache / f"{digest}-{cpu}-lleaves{version}.o"
    model = lleaves.Model(model_file=str(model_file))
    if path.exists():
        model.compile(cache=str(path))
        return model
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    model.compile(cache=str(tmp))
    os.replace(tmp, path)  # two replicas compiling at once each write their own file; either result is the same
    return model
