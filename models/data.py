"""Load and clean the UCI Online Retail data. Every cleaning rule is named, counted and tested.

The cleaned frame has one row per invoice line with columns: invoice, item_id, description, quantity,
price, ts, user_id (string, or <NA> for guest checkouts) and country.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.errors import DataError

RAW_COLUMNS = (
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
)

# Products are five digits with an optional colour/variant suffix (85123A, 15056BL). Everything else in the
# data is a service or ledger code: POST, DOT, M, C2, D, S, BANK CHARGES, AMAZONFEE, CRUK, PADS, B,
# gift_0001_* vouchers and the DCGS* dotcom-shop codes (33 codes, about 3k rows; see NON_PRODUCT_EXAMPLES).
PRODUCT_CODE_PATTERN = r"^\d{5}[A-Z]{0,2}$"

NON_PRODUCT_EXAMPLES = (
    "POST",
    "DOT",
    "M",
    "C2",
    "D",
    "S",
    "BANK CHARGES",
    "AMAZONFEE",
    "CRUK",
    "PADS",
    "B",
    "gift_0001_*",
    "DCGS*",
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_raw(path: Path) -> pd.DataFrame:
    """Read the raw parquet and check it has the dataset's columns."""
    if not path.is_file():
        raise DataError(
            f"data file {path} does not exist: pass --data with the path to online_retail.parquet "
            "(the project ships it as data/online_retail.parquet)"
        )
    try:
        raw = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"data file {path} is not readable parquet ({exc}); restore it from git") from exc
    missing = [c for c in RAW_COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(f"data file {path} lacks columns {missing}: it is not the Online Retail dataset")
    return raw


def normalize_item_id(code: str) -> str:
    """normalize_stock_code: a stock code as cleaning writes it, trimmed and upper-case (' 85123a' -> '85123A'):
    '85123a' and '85123A' are one product written two ways. Cleaning and every id a client sends go through it."""
    return code.strip().upper()


def normalize_user_id(user_id: str) -> str:
    """A customer id as a client may send it, trimmed (' 12347 ' -> '12347'). The data's ids are integers written
    as text, which cleaning never pads."""
    return user_id.strip()


def _normalise(raw: pd.DataFrame) -> pd.DataFrame:
    """Rename to our column names and give each column its type. Changes no values except casing of codes."""
    df = pd.DataFrame(
        {
            "invoice": raw["InvoiceNo"].astype("string"),
            "item_id": raw["StockCode"].astype("string").map(normalize_item_id, na_action="ignore").astype("string"),
            "description": raw["Description"].astype("string"),
            "quantity": raw["Quantity"].astype("int64"),
            "price": raw["UnitPrice"].astype("float64"),
            "ts": pd.to_datetime(raw["InvoiceDate"]).astype("datetime64[ns]"),
            "user_id": raw["CustomerID"].astype("Int64").astype("string"),
            "country": raw["Country"].astype("string"),
        }
    )
    return df


# Each rule returns the mask of rows it drops. Order matters only for the per-rule counts in the report.
Rule = Callable[[pd.DataFrame], pd.Series]


def drop_cancellations(df: pd.DataFrame) -> pd.Series:
    return df["invoice"].str.startswith("C").fillna(False)


def drop_non_positive_quantity_or_price(df: pd.DataFrame) -> pd.Series:
    return (df["quantity"] <= 0) | (df["price"] <= 0)


def drop_exact_duplicates(df: pd.DataFrame) -> pd.Series:
    return df.duplicated(keep="first")


def drop_non_product_codes(df: pd.DataFrame) -> pd.Series:
    return ~df["item_id"].str.fullmatch(PRODUCT_CODE_PATTERN).fillna(False)


RULES: tuple[tuple[str, Rule], ...] = (
    ("drop_cancellations", drop_cancellations),
    ("drop_non_positive_quantity_or_price", drop_non_positive_quantity_or_price),
    ("drop_exact_duplicates", drop_exact_duplicates),
    ("drop_non_product_codes", drop_non_product_codes),
)


@dataclass
class CleanData:
    """All product sales (guests included) and the per-user subset, plus what each rule dropped."""

    sales: pd.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_codes: dict[str, int] = field(default_factory=dict)

    @property
    def interactions(self) -> pd.DataFrame:
        """drop_missing_customer: rows without a CustomerID count for popularity but not per user."""
        return self.sales[self.sales["user_id"].notna()]

    @property
    def first_ts(self) -> pd.Timestamp:
        return self.sales["ts"].min()

    @property
    def last_ts(self) -> pd.Timestamp:
        return self.sales["ts"].max()


def clean(raw: pd.DataFrame) -> CleanData:
    df = _normalise(raw)
    dropped: dict[str, int] = {}
    dropped_codes: dict[str, int] = {}
    for name, rule in RULES:
        mask = rule(df).to_numpy(dtype=bool)
        dropped[name] = int(mask.sum())
        if rule is drop_non_product_codes:
            dropped_codes = {str(k): int(v) for k, v in df.loc[mask, "item_id"].value_counts().items()}
        df = df.loc[~mask]
    df = df.reset_index(drop=True)
    dropped["drop_missing_customer (per-user only)"] = int(df["user_id"].isna().sum())
    # canonical_description is applied per cutoff (Snapshot), never here: the whole file's descriptions
    # would leak post-cutoff text into the item embeddings.
    return CleanData(sales=df, dropped=dropped, dropped_codes=dropped_codes)


def canonical_descriptions(sales: pd.DataFrame) -> pd.Series:
    """canonical_description: per item the most frequent trimmed description; ties go to the first in
    alphabetical order, so the result does not depend on row order. Items with none get their code."""
    desc = sales["description"].str.strip().str.replace(r"\s+", " ", regex=True)
    frame = pd.DataFrame({"item_id": sales["item_id"], "d": desc}).dropna()
    frame = frame[frame["d"] != ""]
    counts = frame.groupby(["item_id", "d"], observed=True).size().reset_index(name="n")
    counts = counts.sort_values(["item_id", "n", "d"], ascending=[True, False, True])
    best = counts.drop_duplicates("item_id").set_index("item_id")["d"]
    items = pd.Index(sales["item_id"].unique())
    return best.reindex(items).fillna(pd.Series(items, index=items)).astype("string")


def load_clean(path: Path) -> CleanData:
    return clean(load_raw(path))


def summarize(data: CleanData) -> dict[str, int | str]:
    inter = data.interactions
    return {
        "rows": len(inter),
        "customers": int(inter["user_id"].nunique()),
        "items": int(inter["item_id"].nunique()),
        "invoices": int(inter["invoice"].nunique()),
        "first": str(data.first_ts),
        "last": str(data.last_ts),
    }


def as_of(frame: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    """The rows strictly before the cutoff. Every model and feature for a cutoff reads only this."""
    return frame[frame["ts"] < cutoff]


def window(frame: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    ts = frame["ts"]
    return frame[(ts >= start) & (ts < end)]


def days_between(later: pd.Timestamp, earlier: pd.Series | np.ndarray) -> np.ndarray:
    return ((later - pd.to_datetime(earlier)) / pd.Timedelta(days=1)).to_numpy(dtype=np.float64)
