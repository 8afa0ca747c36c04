"""`recserve drift report`: an Evidently report of the logged request features against the bundle's reference.

The replicas log what their drift monitor counts (pipeline/serve/driftlog.py). The report takes the requests of the
last `--window`, and as reference a sample reconstructed from the bundle's stored bins and shares
(models/drift.py `reference_sample`): the bundle holds no raw training rows (evidently#506 is what storing them
cost). Evidently (`ValueDrift` per feature) bins with its own edges (Sturges over both samples), so its numbers are
not the gauges'; its verdicts are compared with the gauges' verdict on the same requests, recomputed from the log
with the reference's own bins (`DriftMonitor.distances`). Thresholds are the alert rules' (chain/drift.py); Evidently's
JS distance uses the natural log, so its threshold is the base-2 one times sqrt(ln 2).
Thresholds are per tier (chain/drift.py THRESHOLDS).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chain.drift import THRESHOLDS, DriftMonitor, tier
from models.drift import (
    CANDIDATE_COLUMNS,
    CATEGORICAL_COLUMNS,
    FEATURES,
    NUMERIC_COLUMNS,
    USER_COLUMNS,
    Reference,
    RequestFeatures,
    reference_sample,
)
from models.errors import ConfigError

REFERENCE_ROWS = 20_000
# Evidently's jensenshannon test takes scipy's default base (e): distance_e = distance_2 * sqrt(ln 2).
NATURAL = math.sqrt(math.log(2))
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_window(text: str) -> float:
    """'90s', '30m', '1h', '2d' as seconds; raises ConfigError naming the form."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ConfigError(f"--window {text!r} is not a duration: write e.g. 30m, 1h or 2d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@dataclass(frozen=True)
class Verdict:
    feature: str
    gauge_psi: float
    gauge_js: float
    gauge_drift: bool
    evidently_psi: float
    evidently_js: float
    evidently_drift: bool

    @property
    def agree(self) -> bool:
        return self.gauge_drift == self.evidently_drift


def gauge_values(reference: Reference, logged: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """PSI and JS per feature of the logged requests with the reference's bins: what the gauges show for them (with
    one sampled candidate per request standing for its candidates)."""
    monitor = DriftMonitor(reference, block=max(len(logged), 1) + 1, blocks=1)
    user = logged[list(USER_COLUMNS)].to_numpy(np.float32)
    cand = logged[list(CANDIDATE_COLUMNS)].to_numpy(np.float32)
    for i, row in enumerate(logged[list(CATEGORICAL_COLUMNS)].itertuples(index=False)):
        has = ~np.isnan(cand[i]).all()
        monitor.observe(
            RequestFeatures(user[i], cand[i : i + 1] if has else cand[:0], row[0], row[1] == "known", row[2] == "query")
        )
    return monitor.current()


def _evidently(reference: Reference, logged: pd.DataFrame, out: Path) -> dict[str, tuple[float, float]]:
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    ref = pd.DataFrame(reference_sample(reference, REFERENCE_ROWS))
    definition = DataDefinition(numerical_columns=list(NUMERIC_COLUMNS), categorical_columns=list(CATEGORICAL_COLUMNS))
    current = logged[list(FEATURES)].copy()
    for c in NUMERIC_COLUMNS:
        current[c] = current[c].astype(float)
    # Evidently drops missing values before it tests, and refuses a column left empty (every request a new user's,
    # say): such a column gets no Evidently value (NaN, no drift), where the gauges count the missing bin.
    tested = [c for c in FEATURES if current[c].notna().any() and ref[c].notna().any()]
    metrics = [
        *(ValueDrift(column=c, method="psi", threshold=THRESHOLDS[tier(c)][0]) for c in tested),
        *(ValueDrift(column=c, method="jensenshannon", threshold=THRESHOLDS[tier(c)][1] * NATURAL) for c in tested),
    ]
    snapshot = Report(metrics).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(ref[list(FEATURES)], data_definition=definition),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out))
    values = [float(m["value"]) for m in snapshot.dict()["metrics"]]
    n = len(tested)
    out = dict.fromkeys(FEATURES, (float("nan"), float("nan")))
    return out | {c: (values[i], values[n + i] / NATURAL) for i, c in enumerate(tested)}


def report(reference: Reference, logged: pd.DataFrame, out: Path) -> list[Verdict]:
    """Write the Evidently report of `logged` (DriftLog rows) against the reference to `out` (HTML); per feature,
    the gauges' and Evidently's values and verdicts (JS in base 2 for both). Raises ConfigError with no rows."""
    if logged.empty:
        raise ConfigError("no logged requests in the window: is drift_log_dir set in the serve config's args?")
    ours = gauge_values(reference, logged)
    theirs = _evidently(reference, logged, out)
    return [
        Verdict(
            f,
            ours[f][0],
            ours[f][1],
            ours[f][0] > THRESHOLDS[tier(f)][0] or ours[f][1] > THRESHOLDS[tier(f)][1],
            theirs[f][0],
            theirs[f][1],
            theirs[f][0] >= THRESHOLDS[tier(f)][0] or theirs[f][1] >= THRESHOLDS[tier(f)][1],
        )
        for f in FEATURES
    ]


def table(verdicts: list[Verdict]) -> str:
    rows = [f"{'feature':28} {'gauge psi':>9} {'js':>6} {'drift':>5} | {'evidently psi':>13} {'js':>6} {'drift':>5}"]
    for v in verdicts:
        rows.append(
            f"{v.feature:28} {v.gauge_psi:9.3f} {v.gauge_js:6.3f} {v.gauge_drift!s:>5} | "
            f"{v.evidently_psi:13.3f} {v.evidently_js:6.3f} {v.evidently_drift!s:>5}{'' if v.agree else '  differ'}"
        )
    agree = sum(v.agree for v in verdicts)
    rows.append(f"verdicts agree on {agree} of {len(verdicts)} features")
    return "\n".join(rows)
