from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from models.data import CleanData
from models.errors import CutoffError
from models.features import item_features, user_features
from models.settings import SplitSettings
from models.snapshot import Snapshot
from models.split import cutoff_range, default_cutoff, holdout_truth, resolve_split

SETTINGS = SplitSettings()


def test_default_cutoff_is_30_days_before_last_invoice(real_data):
    cutoff = default_cutoff(real_data, SETTINGS)
    assert cutoff == pd.Timestamp("2011-11-09")
    split = resolve_split(real_data, None, SETTINGS)
    assert split.validation_start == pd.Timestamp("2011-10-10")
    assert split.holdout_end == pd.Timestamp("2011-12-09")


@pytest.mark.parametrize("bad", [dt.date(2012, 1, 1), dt.date(2010, 12, 15), dt.date(2011, 12, 9)])
def test_cutoff_outside_the_data_names_the_allowed_range(real_data, bad):
    earliest, latest = cutoff_range(real_data, SETTINGS)
    with pytest.raises(CutoffError, match=f"between {earliest.date()} and {latest.date()}"):
        resolve_split(real_data, bad, SETTINGS)


def test_holdout_users_bought_before_and_after(real_data):
    split = resolve_split(real_data, None, SETTINGS)
    inter = real_data.interactions
    before = set(inter.loc[inter["ts"] < split.cutoff, "user_id"])
    truth = holdout_truth(inter, split, before)
    assert len(truth) > 1000
    window = inter[(inter["ts"] >= split.cutoff) & (inter["ts"] < split.holdout_end)]
    some_user = next(iter(truth))
    assert truth[some_user] == set(window.loc[window["user_id"] == some_user, "item_id"])
    assert set(truth) <= before


def test_no_leakage_features_identical_with_and_without_post_cutoff_rows(real_data):
    """Everything a model sees for the test is computed from rows before the cutoff: dropping every row on or
    after it changes nothing."""
    split = resolve_split(real_data, None, SETTINGS)
    cut = split.cutoff
    truncated = CleanData(sales=real_data.sales[real_data.sales["ts"] < cut].reset_index(drop=True))
    full = Snapshot.build(real_data.sales, real_data.interactions, cut, 60.0)
    trunc = Snapshot.build(truncated.sales, truncated.interactions, cut, 60.0)
    assert (real_data.sales["ts"] >= cut).sum() > 30_000  # the test really removes data
    np.testing.assert_array_equal(full.item_ids, trunc.item_ids)
    np.testing.assert_array_equal(full.descriptions, trunc.descriptions)
    np.testing.assert_array_equal(full.item_matrix, trunc.item_matrix)
    pd.testing.assert_frame_equal(full.user_frame, trunc.user_frame)
    pd.testing.assert_frame_equal(full.pairs, trunc.pairs)
    assert (full.times_bought != trunc.times_bought).nnz == 0
    # and the same for the blender's validation snapshot
    pd.testing.assert_frame_equal(
        user_features(real_data.interactions, split.validation_start),
        user_features(truncated.interactions, split.validation_start),
    )
    pd.testing.assert_frame_equal(
        item_features(real_data.sales, split.validation_start),
        item_features(truncated.sales, split.validation_start),
    )
