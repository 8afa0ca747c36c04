"""The drift drill on the real small bundle: its holdout replay raises no alarm at the committed thresholds, each
injected shift is flagged within 2,000 requests, and `recserve drift report`'s Evidently verdicts agree with the
gauges' on each shift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chain.drift import BLOCK, BLOCKS, THRESHOLDS, DriftMonitor, over
from chain.offline import open_offline
from loadtests.drift_drill import FLAG_WITHIN, SHIFTS, Features, holdout_queries, inject, replay, shift_stream
from models.bundle import load_core
from models.data import CleanData
from pipeline.commands.drift import report
from pipeline.serve.driftlog import DriftLog, read_window
from tests.conftest import SLICE_CUTOFF


def _sliced(real_data: CleanData) -> CleanData:
    """The data small_bundle was trained on (tests/conftest.py _slice_bundle)."""
    sales = real_data.sales
    sales = sales[(sales["ts"] >= "2011-05-01") & (sales["ts"] < "2011-10-01")]
    top = sales["item_id"].value_counts().index[:600]
    return CleanData(sales=sales[sales["item_id"].isin(top)].reset_index(drop=True))


@pytest.fixture(scope="module")
def drill(small_bundle: Path, real_data: CleanData):
    core = load_core(small_bundle)
    assert core.drift is not None and core.manifest.cutoff == SLICE_CUTOFF
    chain = open_offline(small_bundle)
    feats = Features(chain)
    holdout = [feats(q) for q in holdout_queries(_sliced(real_data), core.manifest.split)]
    return core, chain, feats, holdout


def test_the_holdout_replay_raises_no_alarm(drill) -> None:
    core, _, _, holdout = drill
    rep = replay(core.drift, holdout)
    assert rep.requests > BLOCK * BLOCKS and rep.windows >= BLOCKS
    assert rep.alarms == [], (rep.max_psi, rep.max_js)


@pytest.mark.parametrize("shift", SHIFTS)
def test_each_shift_is_flagged_within_2000_requests_and_evidently_agrees(drill, shift: str, tmp_path: Path) -> None:
    core, chain, feats, holdout = drill
    flagged = inject(core.drift, holdout, shift_stream(chain, feats, shift), shift)
    assert flagged.requests is not None and flagged.requests <= FLAG_WITHIN, flagged

    # The same shift's last full window, logged as a replica logs it, then reported through Evidently.
    log = DriftLog(tmp_path, core.version)
    monitor = DriftMonitor(core.drift, log=log.append)
    stream = shift_stream(chain, feats, shift)
    for _ in range(BLOCK * BLOCKS):
        monitor.observe(next(stream))
    log.close()
    logged = read_window(tmp_path, core.version, 3600)
    assert len(logged) == BLOCK * BLOCKS
    verdicts = report(core.drift, logged, tmp_path / "report.html")
    assert (tmp_path / "report.html").stat().st_size > 10_000
    gauges = set(monitor.over())
    evidently = {v.feature for v in verdicts if v.evidently_drift}
    # The features that flagged the shift in the gauges are flagged by Evidently too, and the report's gauge
    # verdicts (recomputed from the log, one candidate per request) are the gauges' for the per-request features.
    assert set(flagged.features) & evidently, (flagged.features, evidently)
    by_request = {v.feature for v in verdicts if v.gauge_drift and not v.feature.startswith(("cf_", "content_"))}
    assert gauges & by_request
    agree = np.mean([v.agree for v in verdicts])
    print(
        f"{shift}: flagged after {flagged.requests} on {flagged.features}; evidently {sorted(evidently)}; "
        f"gauges {sorted(gauges)}; per-feature verdicts agree {agree:.0%}"
    )
    assert [v.feature for v in verdicts if v.gauge_drift] == over(
        {v.feature: (v.gauge_psi, v.gauge_js) for v in verdicts}, THRESHOLDS
    )
