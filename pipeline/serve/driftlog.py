"""The request features the drift monitor counts, logged for `recserve drift report`: parquet files per replica.

Each replica buffers its requests' monitored values (chain/drift.py `DriftMonitor`: the user features, one candidate's
features drawn at random, the categorical values, a timestamp) and every `flush_rows` requests hands the batch to one
background thread, which writes `<dir>/<bundle version>/<first ts ms>-<pid>-<seq>.parquet`. The request path only
appends a tuple to a list. A failed write is logged and the batch dropped: this log is for reports, never serving.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from chain.drift import BLOCK
from models.drift import CANDIDATE_COLUMNS, USER_COLUMNS, RequestFeatures

log = logging.getLogger("recserve")
Row = tuple[float, RequestFeatures, np.ndarray]


class DriftLog:
    def __init__(self, directory: Path, version: str, flush_rows: int = BLOCK) -> None:
        self.directory = Path(directory) / version
        self.flush_rows = flush_rows
        self._rows: list[Row] = []
        self._seq = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift-log")

    def append(self, ts: float, f: RequestFeatures, candidate: np.ndarray) -> None:
        """One request (DriftMonitor's log callback); a full buffer goes to the writer thread."""
        self._rows.append((ts, f, candidate))
        if len(self._rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        self._seq += 1
        self._pool.submit(self._write, rows, self._seq)

    @staticmethod
    def frame(rows: list[Row]) -> pd.DataFrame:
        """The rows as the report reads them: ts, USER_COLUMNS, CANDIDATE_COLUMNS, and the categorical columns."""
        user = np.stack([f.user for _, f, _ in rows])
        cand = np.stack([c for _, _, c in rows])
        cats = [f.categories() for _, f, _ in rows]
        columns: dict[str, object] = {"ts": np.array([t for t, _, _ in rows])}
        columns |= {c: user[:, j] for j, c in enumerate(USER_COLUMNS)}
        columns |= {c: cand[:, j] for j, c in enumerate(CANDIDATE_COLUMNS)}
        for j, c in enumerate(("user_country", "request_known_user", "request_query")):
            columns[c] = [x[j] for x in cats]
        return pd.DataFrame(columns)

    def _write(self, rows: list[Row], seq: int) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"{int(rows[0][0] * 1000)}-{os.getpid()}-{seq}.parquet"
            tmp = self.directory / f".{name}.partial"
            self.frame(rows).to_parquet(tmp, index=False)
            tmp.rename(self.directory / name)  # a reader never sees half a file
        except Exception:
            log.exception("drift log: a batch of %d requests could not be written to %s", len(rows), self.directory)

    def close(self) -> None:
        """Write what is buffered and wait for the writer."""
        self.flush()
        self._pool.shutdown(wait=True)


def read_window(directory: Path, version: str, seconds: float, now: float | None = None) -> pd.DataFrame:
    """Every logged request of `version` in the last `seconds` (by its ts, s since the epoch), from every replica's
    files; an empty frame when there are none."""
    folder = Path(directory) / version
    since = (time.time() if now is None else now) - seconds
    frames = []
    for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        frame = pd.read_parquet(path)
        frames.append(frame[frame["ts"] >= since])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
