"""The Grafana dashboard, without a server: the committed JSON is what pipeline/serve/dashboard.py generates, it
decodes with grafana-foundation-sdk, its panels have unique ids and do not overlap on the grid, and every query
parses as PromQL once its variables are filled in (promql-parser). That every panel shows data against a real
Prometheus is test_observability_e2e.py's."""

from __future__ import annotations

import json

import promql_parser

from pipeline.serve import dashboard
from tests.support.dashboard import EXPECTED_EMPTY, fill, load, query_variables, targets


def test_the_committed_json_is_what_the_code_generates():
    assert dashboard.OUT.read_text() == dashboard.render(), "stale: run python -m pipeline.serve.dashboard"
    assert dashboard.main(["--check"]) == 0


def test_it_decodes_with_the_sdk_and_encodes_back_to_the_same_json():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    board = load()
    assert board.uid == dashboard.UID and len(board.panels) == len(dashboard.PANELS)
    assert json.loads(JSONEncoder(sort_keys=True).encode(board)) == json.loads(dashboard.OUT.read_text())


def test_panel_ids_are_unique_and_panels_do_not_overlap():
    panels = load().panels
    ids = [p.id_val for p in panels]
    assert len(set(ids)) == len(ids) and None not in ids, ids
    boxes = [(p.title, p.grid_pos.x, p.grid_pos.y, p.grid_pos.w, p.grid_pos.h) for p in panels]
    for title, x, _, w, h in boxes:
        assert x >= 0 and x + w <= 24 and w > 0 and h > 0, title
    for i, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[i + 1 :]:
            apart = ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
            assert apart, f"{a!r} overlaps {b!r}"


def test_every_expression_parses_with_its_variables_filled_in():
    board = load()
    names = query_variables(board)
    assert set(names) == {"route", "arm"}
    found = targets(board)
    assert len(found) >= len(board.panels)
    for t in found:
        for values in ({n: None for n in names}, {"route": ["/recommend", "/items/similar"], "arm": ["champion.v2"]}):
            promql_parser.parse(fill(t.expr, values))
        for name in names:  # a variable a query names is one the dashboard defines
            assert f"${name}" not in t.expr or name in names
    for q in names.values():
        assert q.startswith("label_values(")


def test_the_empty_allowlist_names_only_drift():
    titles = {p.title for p in load().panels}
    assert set(EXPECTED_EMPTY) <= titles
    assert all("drift" in k.lower() and "issue 14 drift" in v for k, v in EXPECTED_EMPTY.items())
