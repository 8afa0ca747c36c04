"""The drift drill on the real small bundle: its holdout replay raises no alarm at the committed thresholds, each
injected shift is flagged within 2,000 requests, and `recserve drift report`'s Evidently verdicts agree with the
gauges' on every feature of each shift (Evidently counting the reference's own bins from the logged rows)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chain.drift import BLOCK, BLOCKS
from chain.offline import open_offline
from loadtests.drift_drill import (
    FLAG_WITHIN,
    SHIFTS,
    Features,
    holdout_queries,
    inject,
    logged_window,
    replay,
    shift_stream,
)
from models.bundle import load_core
from models.data import CleanData
from models.drift import CANDIDATE_COLUMNS, FEATURES
from pipeline.commands.drift import report
from tests.conftest import SLICE_CUTOFF

ROOT = Path(__file__).resolve().parents[2]


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

    # The shift's first full window, logged as a replica logs it; the live monitor's gauges are over exactly these
    # 1,000 requests (the same requests, not a sliding window against a time window).
    monitor, logged = logged_window(core.drift, shift_stream(chain, feats, shift), tmp_path, core.version)
    assert len(logged) == BLOCK * BLOCKS
    verdicts = report(core.drift, logged, tmp_path / "report.html")
    assert (tmp_path / "report.html").stat().st_size > 10_000
    live = {f: (f in monitor.over()) for f in FEATURES}
    print(f"\n{shift}: flagged after {flagged.requests} on {flagged.features}")
    for v in verdicts:
        p, j = monitor.values[v.feature]
        print(
            f"{v.feature:28} live {live[v.feature]!s:5} {p:7.3f} {j:6.3f} | log {v.gauge_drift!s:5} {v.gauge_psi:7.3f}"
            f" {v.gauge_js:6.3f} | evidently {v.evidently_drift!s:5} {v.evidently_psi:7.3f} {v.evidently_js:6.3f}"
        )
    # Evidently, counting the same bins from the logged rows, computes the gauges' numbers (the reference's shares
    # to within 1e-5, the same floor for empty bins) and so gives the same verdict on every feature.
    assert all(v.same_floor for v in verdicts)
    for v in verdicts:
        assert v.evidently_psi == pytest.approx(v.gauge_psi, rel=1e-3, abs=1e-4), v
        assert v.evidently_js == pytest.approx(v.gauge_js, rel=1e-3, abs=1e-4), v
    assert [v.feature for v in verdicts if not v.agree] == []
    # Against the live gauges: a per-request feature (user features, country, known/new, query) is logged whole, so
    # the values are the live ones and the verdicts equal. A candidate feature is logged as one candidate drawn per
    # request where the live monitor counts up to 32 (MAX_CANDIDATES): the same distribution in expectation, but a
    # sample of 1,000 against up to 32,000, so its verdict against the live gauge is printed, not asserted (a CI run
    # saw ui_days_since_last_bought at PSI 0.25 in the log and 0.18 live, threshold 0.25).
    for v in verdicts:
        p, j = monitor.values[v.feature]
        if v.feature not in CANDIDATE_COLUMNS:
            assert (v.gauge_psi, v.gauge_js) == pytest.approx((p, j), abs=1e-9), v
            assert v.evidently_drift == live[v.feature], v
    per_request = set(flagged.features) - set(CANDIDATE_COLUMNS)
    assert per_request <= {v.feature for v in verdicts if v.evidently_drift}


def test_recserve_drift_report_over_a_real_log(drill, tmp_path: Path) -> None:
    """The CLI, as an operator runs it, over a real log of the new-users shift: the HTML exists, the table is printed
    and every feature's verdicts agree."""
    core, chain, feats, _ = drill
    logged_window(core.drift, shift_stream(chain, feats, "new_users"), tmp_path / "log", core.version)
    out = tmp_path / "report.html"
    cmd = [sys.executable, "-m", "pipeline.commands.cli", "drift", "report", "--window", "1h", "--out", str(out)]
    cmd += ["--log-dir", str(tmp_path / "log"), "--bundle", str(core.path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)
    assert out.stat().st_size > 10_000
    assert f"verdicts agree on {len(FEATURES)} of {len(FEATURES)} features" in run.stdout
    assert f"{BLOCK * BLOCKS} requests of the last 1h" in run.stdout
