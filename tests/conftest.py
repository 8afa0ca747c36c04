from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from settings import DATA_FILE, PROJECT_ROOT, configure_process

configure_process()  # as every entry point does, before numpy loads (pytest's plugins may have loaded it: then capped)

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from models.data import CleanData, load_clean  # noqa: E402
from tests.support.s3_server import OwnS3  # noqa: E402

ROOT = PROJECT_ROOT
DATA = DATA_FILE


@pytest.fixture(scope="session")
def real_data() -> CleanData:
    return load_clean(DATA)


def raw_rows(rows: list[dict]) -> pd.DataFrame:
    """A raw frame in the dataset's own schema, with defaults for the columns a test does not care about."""
    base = {
        "InvoiceNo": "536365",
        "StockCode": "85123A",
        "Description": "WHITE HANGING HEART T-LIGHT HOLDER",
        "Quantity": 6,
        "InvoiceDate": "2011-01-01 10:00",
        "UnitPrice": 2.55,
        "CustomerID": 17850,
        "Country": "United Kingdom",
    }
    frame = pd.DataFrame([{**base, **r} for r in rows])
    frame["InvoiceNo"] = frame["InvoiceNo"].astype("string")
    frame["StockCode"] = frame["StockCode"].astype("string")
    frame["Description"] = frame["Description"].astype("string")
    frame["InvoiceDate"] = pd.to_datetime(frame["InvoiceDate"])
    frame["CustomerID"] = frame["CustomerID"].astype("Int64")
    frame["Country"] = frame["Country"].astype("string")
    return frame


SLICE_CUTOFF = pd.Timestamp("2011-09-01")


def _slice_bundle(real_data: CleanData, out: Path, version: str, factors: int) -> Path:
    """A bundle trained on a slice of the real data: May-September 2011, the 600 best-selling items."""
    from models.settings import BlenderSettings, CFSettings, TrainSettings
    from training.train import train

    sales = real_data.sales
    sales = sales[(sales["ts"] >= "2011-05-01") & (sales["ts"] < "2011-10-01")]
    top = sales["item_id"].value_counts().index[:600]
    sliced = CleanData(sales=sales[sales["item_id"].isin(top)].reset_index(drop=True))
    settings = TrainSettings(
        cf=CFSettings(factors=factors, iterations=5), blender=BlenderSettings(n_estimators=40, early_stopping_rounds=10)
    )
    return train(DATA, out, SLICE_CUTOFF.date(), version, settings, progress=False, data=sliced).path


@pytest.fixture(scope="session")
def small_bundle(real_data, tmp_path_factory) -> Path:
    return _slice_bundle(real_data, tmp_path_factory.mktemp("artifacts"), "slice-v1", factors=16)


@pytest.fixture(scope="session")
def second_bundle(real_data, tmp_path_factory) -> Path:
    """Another model of the same slice (8 CF factors, not 16): a challenger for rollout tests."""
    return _slice_bundle(real_data, tmp_path_factory.mktemp("artifacts-v2"), "slice-v2", factors=8)


def recserve(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The console script as a user runs it, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.commands.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@dataclass(frozen=True)
class Trained:
    path: Path
    stdout: str


@pytest.fixture(scope="session")
def full_bundle(tmp_path_factory) -> Trained:
    """`recserve train` with every default, once per session: the bundle the product ships."""
    out_dir = tmp_path_factory.mktemp("full-artifacts")
    out = recserve("train", "--out", str(out_dir), "--version", "full", "--quiet")
    assert out.returncode == 0, out.stderr
    return Trained(out_dir / "full", out.stdout)


@pytest.fixture(scope="session")
def s3() -> Iterator[OwnS3]:
    """A real S3 API server (moto's server mode) of the session's own, on a free port."""
    server = OwnS3()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3: OwnS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's AWS variables pointed at the test's S3 server (pyarrow and boto3 read them per client)."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3.env()
