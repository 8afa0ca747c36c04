"""The committed Grafana dashboard as the tests read it: decoded by grafana-foundation-sdk (its panel and query
plugins registered, so a target decodes as a Prometheus query, not an unknown one), and each query with its
variables filled in as Grafana fills them."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus

from pipeline.serve.dashboard import OUT

# Panels allowed to show nothing against a live app, each naming the change that brings their data. None now: the
# drift gauges are exported from the start of serving (0 until the first block of requests closes, chain/drift.py).
EXPECTED_EMPTY: dict[str, str] = {}


@dataclass(frozen=True)
class Target:
    panel: str
    ref: str
    expr: str


def load() -> model.Dashboard:
    register_default_plugins()
    return model.Dashboard.from_json(json.loads(OUT.read_text()))


def targets(board: model.Dashboard) -> list[Target]:
    out = []
    for panel in board.panels or []:
        assert isinstance(panel, model.Panel), panel
        for t in panel.targets or []:
            assert isinstance(t, prometheus.Dataquery), (panel.title, t)
            out.append(Target(panel.title or "", t.ref_id or "", t.expr))
    return out


def query_variables(board: model.Dashboard) -> dict[str, str]:
    """name -> `label_values(metric, label)` for each query variable."""
    tpl = board.templating.list_val or []
    return {v.name: str(v.query) for v in tpl if v.type_val == "query"}


def fill(expr: str, values: dict[str, list[str] | None], rate_interval: str = "1m") -> str:
    """`expr` as Grafana sends it: $__rate_interval as `rate_interval`; a multi-value variable as the alternation
    of its values, each regex-escaped with the backslashes doubled for PromQL's string literal (as Grafana's
    Prometheus datasource does), or as the dashboard's allValue `.*` for None (All)."""
    out = expr.replace("$__rate_interval", rate_interval)
    for name in sorted(values, key=len, reverse=True):
        chosen = values[name]
        alternation = ".*" if chosen is None else "|".join(re.escape(v).replace("\\", "\\\\") for v in chosen)
        out = out.replace(f"${{{name}}}", alternation).replace(f"${name}", alternation)
    assert "$" not in out, f"a variable left unfilled in {out}"
    return out


def label_values(query: str, lookup: Callable[[str, str], list[str]]) -> list[str]:
    """The values of `label_values(metric, label)` through `lookup(metric, label)`."""
    m = re.fullmatch(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", query)
    assert m, f"not a label_values(metric, label) query: {query}"
    return lookup(m[1], m[2])
