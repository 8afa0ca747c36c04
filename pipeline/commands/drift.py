"""`recserve drift report`: an Evidently report of the logged request features against the bundle's reference.

The replicas log what their drift monitor counts (pipeline/serve/driftlog.py). The bundle's reference is a binned
distribution (models/drift.py: decile bins and a missing bin per numeric input, category shares), not rows
(evidently#506 is what storing rows cost), so Evidently gets the data in that representation, like with like:
- current: each logged value of the last `--window` as the label of its reference bin ("03 [1.5, 2.7)", "missing")
  or its category (models/drift.py `labels_of`, exactly as `DriftMonitor` bins it);
- reference: REFERENCE_ROWS labels per feature whose counts are the stored shares x REFERENCE_ROWS, rounded by largest
  remainder (`reference_counts`: each share to within 1/REFERENCE_ROWS);
every column categorical. Evidently (0.7.23, `ValueDrift(column, method="psi" | "jensenshannon", threshold)`) then
counts the bins itself from the logged rows and computes both statistics
(evidently/legacy/calculations/stattests/psi.py, jensenshannon.py, utils.py `get_binned_data`), with the gauges'
thresholds (chain/drift.py THRESHOLDS, per tier), adjusted for two differences of its own:
- JS: scipy's `jensenshannon` with its default base e; the gauges' is base 2, so Evidently's threshold is the base-2
  one x sqrt(ln 2), and its value / sqrt(ln 2) is printed;
- PSI's floor: Evidently replaces an empty bin's share (0) by 1e-4, or by (smallest non-zero share) / 1e6 when that
  share is <= 1e-4; the gauges floor every share at 1e-4 (models/drift.py EPS). The two are the same when every
  non-zero share on both sides is over 1e-4: a reference share of at least 1e-4 + 1/REFERENCE_ROWS and a window of
  fewer than 10,000 requests. A feature where they are not is marked in the table (`floor`).
- Evidently calls drift at >= the threshold, the gauges at >.
The gauges' values here are `DriftMonitor`'s over the same logged rows (one logged candidate per request standing for
the request's candidates, as the log holds; the live gauges count up to 32).
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
    EPS,
    FEATURES,
    USER_COLUMNS,
    Reference,
    RequestFeatures,
    feature_labels,
    labels_of,
    reference_counts,
)
from models.errors import ConfigError

REFERENCE_ROWS = 100_000  # the reference frame's rows: shares to within 1e-5
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
    """One feature's gauge and Evidently values (PSI, JS base 2) and verdicts; `same_floor`: PSI's floors for empty
    bins are the same in both (see the module's docstring)."""

    feature: str
    gauge_psi: float
    gauge_js: float
    gauge_drift: bool
    evidently_psi: float
    evidently_js: float
    evidently_drift: bool
    same_floor: bool = True

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


def binned_frames(reference: Reference, logged: pd.DataFrame, rows: int = REFERENCE_ROWS) -> tuple[pd.DataFrame, ...]:
    """(current, reference): the logged rows as their bin labels per feature (None where the monitor counts
    nothing), and `rows` labels per feature in the reference's stored shares (largest-remainder counts)."""
    current = pd.DataFrame({f: labels_of(reference, f, logged[f].to_numpy()) for f in FEATURES})
    ref = {}
    for f in FEATURES:
        probs = reference.numeric[f].probs if f in reference.numeric else reference.categorical[f].probs
        ref[f] = np.repeat(np.asarray(feature_labels(reference, f), dtype=object), reference_counts(probs, rows))
    return current, pd.DataFrame(ref)


def same_floor(reference: pd.Series, current: pd.Series) -> bool:
    """Whether Evidently's PSI floor for empty bins is the gauges' (EPS) on these two label columns: every
    non-zero share on both sides over EPS (evidently/legacy/calculations/stattests/utils.py get_binned_data)."""
    return all(s.dropna().value_counts(normalize=True).min() > EPS for s in (reference, current) if s.notna().any())


def _evidently(reference: Reference, logged: pd.DataFrame, out: Path) -> dict[str, tuple[float, float, bool]]:
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    current, ref = binned_frames(reference, logged)
    definition = DataDefinition(categorical_columns=list(FEATURES))
    # A column with nothing counted (no value the monitor counts) gets no Evidently value: it refuses an empty
    # column, and the gauges read (0, 0) for it.
    tested = [c for c in FEATURES if current[c].notna().any()]
    metrics = [
        *(ValueDrift(column=c, method="psi", threshold=THRESHOLDS[tier(c)][0]) for c in tested),
        *(ValueDrift(column=c, method="jensenshannon", threshold=THRESHOLDS[tier(c)][1] * NATURAL) for c in tested),
    ]
    snapshot = Report(metrics).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(ref, data_definition=definition),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out))
    values = [float(m["value"]) for m in snapshot.dict()["metrics"]]
    if len(values) != 2 * len(tested):
        raise RuntimeError(f"Evidently returned {len(values)} values for {2 * len(tested)} metrics")
    n = len(tested)
    result = dict.fromkeys(FEATURES, (0.0, 0.0, True))
    return result | {
        c: (values[i], values[n + i] / NATURAL, same_floor(ref[c], current[c])) for i, c in enumerate(tested)
    }


def report(reference: Reference, logged: pd.DataFrame, out: Path) -> list[Verdict]:
    """Write the Evidently report of `logged` (DriftLog rows) against the reference to `out` (HTML); per feature,
    the gauges' and Evidently's values and verdicts (JS in base 2 for both). Raises ConfigError with no rows."""
    if logged.empty:
        raise ConfigError("no logged requests in the window: is drift_log_dir set in the serve config's args?")
    ours = gauge_values(reference, logged)
    theirs = _evidently(reference, logged, out)
    verdicts = []
    for f in FEATURES:
        psi_t, js_t = THRESHOLDS[tier(f)]
        (gp, gj), (ep, ej, floor) = ours[f], theirs[f]
        # Evidently's own comparisons (psi.py, jensenshannon.py): value >= threshold, JS's in base e.
        verdicts.append(
            Verdict(f, gp, gj, gp > psi_t or gj > js_t, ep, ej, ep >= psi_t or ej * NATURAL >= js_t * NATURAL, floor)
        )
    return verdicts


def table(verdicts: list[Verdict]) -> str:
    """The per-feature table the CLI prints, and the agreement count."""
    rows = [f"{'feature':28} {'gauge psi':>9} {'js':>6} {'drift':>5} | {'evidently psi':>13} {'js':>6} {'drift':>5}"]
    for v in verdicts:
        note = ("" if v.agree else "  differ") + ("" if v.same_floor else "  floor")
        rows.append(
            f"{v.feature:28} {v.gauge_psi:9.3f} {v.gauge_js:6.3f} {v.gauge_drift!s:>5} | "
            f"{v.evidently_psi:13.3f} {v.evidently_js:6.3f} {v.evidently_drift!s:>5}{note}"
        )
    agree = sum(v.agree for v in verdicts)
    rows.append(f"verdicts agree on {agree} of {len(verdicts)} features")
    if not all(v.same_floor for v in verdicts):
        rows.append("floor: Evidently floored an empty bin below the gauges' 1e-4 (a share <= 1e-4 on a side)")
    return "\n".join(rows)
