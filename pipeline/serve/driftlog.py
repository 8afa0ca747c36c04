"""The request features the drift monitor counts, logged for `recserve drift report`: parquet files per replica.

Each replica buffers its requests' monitored values (chain/drift.py `DriftMonitor`: the user features, one sampled
candidate's features, the categorical values, a timestamp) and every `flush_rows` requests hands the batch to one
background thread, which writes `<dir>/<bundle version>/<first ts ms>-<pid>-<seq>.parquet`. The request path only
appends to a list. A failed write is logged and the batch dropped: this log is for reports, never for serving.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from chain.drift import BLOCK

log = logging.getLogger("recserve")


class DriftLog:
    def __init__(self, directory: Path, version: str, flush_rows: int = BLOCK) -> None:
        self.directory = Path(directory) / version
        self.flush_rows = flush_rows
        self._rows: list[dict[str, Any]] = []
        self._seq = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift-log")

    def append(self, row: dict[str, Any]) -> None:
        """One request's values (DriftMonitor's log callback); a full buffer goes to the writer thread."""
        self._rows.append(row)
        if len(self._rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        self._seq += 1
        self._pool.submit(self._write, rows, self._seq)

    def _write(self, rows: list[dict[str, Any]], seq: int) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"{int(rows[0]['ts'] * 1000)}-{os.getpid()}-{seq}.parquet"
            tmp = self.directory / f".{name}.partial"
            pd.DataFrame(rows).to_parquet(tmp, index=False)
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
