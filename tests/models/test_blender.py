from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from models.blender import Blender
from models.errors import SchemaMismatchError
from models.features import BLENDER_FEATURES
from models.settings import BlenderSettings


def synthetic(n_groups: int = 300, size: int = 20, seed: int = 0):
    """Relevance depends on two features only; the rest is noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_groups * size, len(BLENDER_FEATURES))).astype(np.float32)
    a, b = BLENDER_FEATURES.index("cf_score"), BLENDER_FEATURES.index("ui_times_bought")
    logit = 2.0 * x[:, a] + 1.5 * x[:, b] - 2.5
    y = (rng.random(x.shape[0]) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return x, y, np.full(n_groups, size)


@pytest.fixture(scope="module")
def fitted():
    x, y, g = synthetic()
    return Blender.fit(x, y, g, BlenderSettings(n_estimators=60, min_data_in_leaf=20), seed=3, num_threads=1)


def test_learns_the_relevant_features(fitted):
    blender, stats = fitted
    assert stats["valid_ndcg@10"] > 0.6
    imp = blender.importance()
    top2 = sorted(imp, key=imp.get, reverse=True)[:2]
    assert set(top2) == {"cf_score", "ui_times_bought"}


def test_ranks_unseen_data_better_than_chance(fitted):
    blender, _ = fitted
    x, y, _ = synthetic(n_groups=50, seed=9)
    s = blender.predict(x)
    assert np.corrcoef(s, y)[0, 1] > 0.3


def test_save_load_round_trip(fitted, tmp_path):
    blender, _ = fitted
    blender.save(tmp_path)
    back = Blender.load(tmp_path)
    x, _, _ = synthetic(n_groups=3, seed=5)
    np.testing.assert_allclose(back.predict(x), blender.predict(x))


def test_compiled_trees_score_as_lightgbm(fitted, tmp_path):
    blender, _ = fitted
    blender.save(tmp_path)
    reference = Blender.load(tmp_path, compile=False)
    compiled = Blender.load(tmp_path, compile_cache=tmp_path / "cache")
    assert reference.compiled is None and compiled.compiled is not None
    x, _, _ = synthetic(n_groups=20, seed=7)
    x[::3, BLENDER_FEATURES.index("cf_score")] = np.nan  # missing values take LightGBM's default branch
    np.testing.assert_allclose(compiled.predict(x), reference.predict(x), rtol=0, atol=1e-9)
    # The second load reads the object file the first one wrote.
    assert len(list((tmp_path / "cache" / "recserve-lleaves").glob("*.o"))) == 1
    again = Blender.load(tmp_path, compile_cache=tmp_path / "cache")
    np.testing.assert_allclose(again.predict(x), reference.predict(x), rtol=0, atol=1e-9)


def test_refuses_a_model_trained_on_other_features():
    x = np.random.default_rng(0).normal(size=(100, 3))
    booster = lgb.train({"objective": "regression", "verbosity": -1}, lgb.Dataset(x, label=x[:, 0]), 2)
    with pytest.raises(SchemaMismatchError, match="retrain"):
        Blender(booster)
