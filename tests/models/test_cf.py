from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from models.cf import ALSModel
from models.settings import CFSettings


def block_matrix(n_users: int = 60, n_items: int = 40, seed: int = 0) -> sp.csr_matrix:
    """Two taste groups: users < n/2 buy items < m/2, the others the rest."""
    rng = np.random.default_rng(seed)
    rows, cols, vals = [], [], []
    for u in range(n_users):
        block = range(0, n_items // 2) if u < n_users // 2 else range(n_items // 2, n_items)
        for i in rng.choice(list(block), size=8, replace=False):
            rows.append(u)
            cols.append(int(i))
            vals.append(float(rng.integers(1, 5)))
    return sp.csr_matrix((vals, (rows, cols)), shape=(n_users, n_items))


@pytest.fixture(scope="module", params=["bm25", "log"])
def model(request):
    settings = CFSettings(factors=8, iterations=20, regularization=0.1, weighting=request.param)
    return ALSModel.fit(block_matrix(), settings, seed=1, num_threads=1, show_progress=False)


def test_scores_follow_the_taste_groups(model):
    scores = model.score_users(np.array([0, 59]))
    assert scores[0, :20].mean() > scores[0, 20:].mean() + 0.1
    assert scores[1, 20:].mean() > scores[1, :20].mean() + 0.1


def test_fold_in_matches_implicits_recalculate_user(model):
    from implicit.cpu.als import AlternatingLeastSquares

    ref = AlternatingLeastSquares(factors=8, regularization=model.regularization, alpha=1.0)
    ref.user_factors = model.user_factors
    ref.item_factors = model.item_factors
    items = np.array([1, 4, 9])
    counts = np.array([2.0, 1.0, 3.0])
    conf = model.weighting.apply(items, counts).astype(np.float32)
    row = sp.csr_matrix((conf, (np.zeros(3, int), items)), shape=(1, model.n_items))
    expected = ref.recalculate_user(0, row)
    np.testing.assert_allclose(model.fold_in_user(items, counts), expected, rtol=1e-3, atol=1e-4)


def test_fold_in_a_new_user_moves_scores_toward_their_items(model):
    vec = model.fold_in_user(np.array([30, 31, 32]), np.array([1.0, 1.0, 1.0]))
    scores = model.score(vec)
    assert scores[20:].mean() > scores[:20].mean()
    assert np.all(model.fold_in_user(np.array([], dtype=np.int64), np.array([])) == 0)


def test_save_load_round_trip(model, tmp_path):
    model.save(tmp_path)
    back = ALSModel.load(tmp_path, model.weighting.settings)
    np.testing.assert_array_equal(back.item_factors, model.item_factors)
    np.testing.assert_array_equal(back.weighting.idf, model.weighting.idf)
    np.testing.assert_allclose(back.score(back.user_factors[3]), model.score(model.user_factors[3]))
