from __future__ import annotations

import numpy as np
import pytest

from models.content import EMBEDDING_DIM, ContentModel, encode, load_encoder

TEXTS = [
    "RED RETROSPOT MUG",
    "RED SPOTTY CUP AND SAUCER",
    "CHRISTMAS TREE DECORATION",
    "HANGING STAR CHRISTMAS ORNAMENT",
    "GARDEN TROWEL",
]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(device="cpu", num_threads=2)


@pytest.fixture(scope="module")
def model(encoder):
    return ContentModel(encode(encoder, TEXTS, batch_size=8, progress=False))


def test_embeddings_are_unit_vectors_of_minilm(model):
    assert model.embeddings.shape == (len(TEXTS), EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(model.embeddings, axis=1), 1.0, rtol=1e-5)


def test_similar_items_share_meaning_and_exclude_the_item(model):
    items, _ = model.similar(2, 2)
    assert 2 not in items.tolist()
    assert items[0] == 3  # the Christmas ornament, not the mug or the trowel
    assert model.similar(0, 1)[0][0] == 1


def test_profile_weights_recent_items(model):
    profile = model.profile(np.array([2, 0]), np.array([1.0, 0.05]))
    scores = model.score(profile)
    assert scores[3] > scores[1]
    assert np.all(model.profile(np.array([], dtype=np.int64), np.array([])) == 0)


def test_free_text_query_runs_the_encoder(model):
    scores = model.score(model.encode_query("a mug for tea"))
    assert int(np.argmax(scores)) in (0, 1)


def test_save_load_round_trip(model, tmp_path):
    model.save(tmp_path)
    back = ContentModel.load(tmp_path)
    np.testing.assert_array_equal(back.embeddings, model.embeddings)
