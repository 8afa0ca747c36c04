from __future__ import annotations

import pandas as pd
import pytest

from models.data import (
    RULES,
    canonical_descriptions,
    clean,
    drop_cancellations,
    drop_exact_duplicates,
    drop_non_positive_quantity_or_price,
    drop_non_product_codes,
    load_raw,
    summarize,
)
from models.errors import DataError
from tests.conftest import raw_rows


def _norm(rows: list[dict]) -> pd.DataFrame:
    from models.data import _normalise

    return _normalise(raw_rows(rows))


def test_drop_cancellations_marks_only_c_invoices():
    df = _norm([{"InvoiceNo": "C536379", "Quantity": -1}, {"InvoiceNo": "536380"}])
    assert drop_cancellations(df).tolist() == [True, False]


def test_drop_non_positive_quantity_or_price():
    df = _norm([{"Quantity": 0}, {"Quantity": -3}, {"UnitPrice": 0.0}, {"UnitPrice": -11062.06}, {}])
    assert drop_non_positive_quantity_or_price(df).tolist() == [True, True, True, True, False]


def test_drop_exact_duplicates_keeps_first_copy():
    df = _norm([{}, {}, {"Quantity": 7}])
    assert drop_exact_duplicates(df).tolist() == [False, True, False]


@pytest.mark.parametrize(
    ("code", "dropped"),
    [
        ("85123A", False),
        ("85123a", False),
        ("71053", False),
        ("15056BL", False),
        ("POST", True),
        ("DOT", True),
        ("M", True),
        ("C2", True),
        ("BANK CHARGES", True),
        ("AMAZONFEE", True),
        ("gift_0001_20", True),
        ("DCGS0003", True),
        ("PADS", True),
        ("B", True),
    ],
)
def test_drop_non_product_codes(code, dropped):
    assert drop_non_product_codes(_norm([{"StockCode": code}])).tolist() == [dropped]


def test_stock_codes_are_upper_cased_so_variants_merge():
    data = clean(raw_rows([{"StockCode": "85123a"}, {"StockCode": "85123A", "InvoiceNo": "536366"}]))
    assert data.sales["item_id"].tolist() == ["85123A", "85123A"]


def test_missing_customer_rows_count_for_sales_but_not_interactions():
    data = clean(raw_rows([{"CustomerID": None}, {"InvoiceNo": "536366"}]))
    assert len(data.sales) == 2
    assert len(data.interactions) == 1
    assert data.dropped["drop_missing_customer (per-user only)"] == 1


def test_canonical_description_is_trimmed_most_frequent_then_alphabetical():
    df = _norm(
        [
            {"Description": " RED MUG "},
            {"Description": "RED MUG", "InvoiceNo": "2"},
            {"Description": "red mug?", "InvoiceNo": "3"},
            {"StockCode": "22222", "Description": "B THING"},
            {"StockCode": "22222", "Description": "A THING", "InvoiceNo": "4"},
            {"StockCode": "33333", "Description": None},
        ]
    )
    desc = canonical_descriptions(df)
    assert desc["85123A"] == "RED MUG"
    assert desc["22222"] == "A THING"
    assert desc["33333"] == "33333"


def test_every_rule_is_counted(real_data):
    assert [name for name, _ in RULES] == list(real_data.dropped)[: len(RULES)]
    assert real_data.dropped["drop_cancellations"] == 9288  # the dataset README's count


def test_real_data_cleans_to_expected_size(real_data):
    s = summarize(real_data)
    # The README's CF subset (397,884 rows) before de-duplication and the non-product rule.
    assert 385_000 <= s["rows"] <= 398_000
    assert 4_250 <= s["customers"] <= 4_372
    assert 3_500 <= s["items"] <= 3_700
    inter = real_data.interactions
    assert (inter["quantity"] > 0).all() and (inter["price"] > 0).all()
    assert not inter["invoice"].str.startswith("C").any()
    assert inter["item_id"].str.fullmatch(r"\d{5}[A-Z]{0,2}").all()
    assert not inter.duplicated().any()


def test_dropped_codes_are_all_non_products(real_data):
    codes = set(real_data.dropped_codes)
    assert {"POST", "DOT", "M", "C2", "BANK CHARGES", "AMAZONFEE"} <= codes
    assert not any(c[:5].isdigit() and len(c) <= 7 for c in codes)


def test_load_raw_names_the_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_raw(tmp_path / "nope.parquet")


def test_load_raw_rejects_other_data(tmp_path):
    p = tmp_path / "x.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(p)
    with pytest.raises(DataError, match="lacks columns"):
        load_raw(p)
