"""recserve's Grafana dashboard, generated here with grafana-foundation-sdk and committed as
deploy/grafana/dashboards/recserve.json (which compose.yaml provisions). Regenerate after a change:

    python -m pipeline.serve.dashboard          # writes the JSON
    python -m pipeline.serve.dashboard --check  # exit 1 when the committed JSON is not what this code makes

Every query reads the series Prometheus scrapes from Ray's metrics agent (deploy/prometheus.yml): recserve's own
metrics as `ray_` + their name in pipeline/serve/metrics.py (`_total` on counters), and Serve's `ray_serve_*`.
Latencies are in milliseconds, rates per second, shares in percent. tests/pipeline/serve/test_dashboard.py checks
the layout and every expression; tests/pipeline/serve/test_observability_e2e.py checks that every panel shows data
against a real Prometheus scraping the running app.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import common as gcommon
from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import prometheus as gprom
from grafana_foundation_sdk.builders import timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cmodel
from grafana_foundation_sdk.models import dashboard as model

from settings import PROJECT_ROOT

OUT = PROJECT_ROOT / "deploy" / "grafana" / "dashboards" / "recserve.json"
UID = "recserve"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"  # Grafana's window for rate(): at least 4 scrape intervals


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    """One time-series panel: its place on the 24-column grid (x, y, w, h in grid units) and its queries."""

    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    x: int
    y: int
    w: int = 12
    h: int = 8
    extra: dict[str, float] = field(default_factory=dict)


def quantiles(metric: str, by: str, selector: str) -> tuple[Query, ...]:
    """p50 and p99 of a latency histogram per `by`, as PromQL's histogram_quantile interpolates them."""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"{{{{{by}}}}} p{round(q * 100)}",
        )
        for q in (0.5, 0.99)
    )


PANELS: tuple[PanelSpec, ...] = (
    PanelSpec(
        "Latency by route (p50, p99)",
        "End-to-end latency on the server, from HAProxy's X-Request-Start stamp to the answer "
        "(recserve_request_latency_ms), per route; the SLO is p99 <= 100 ms on "
        "/recommend (deploy/alerts.yml RecserveP99High).",
        "ms",
        quantiles("ray_recserve_request_latency_ms", "route", 'route=~"$route"'),
        x=0,
        y=0,
    ),
    PanelSpec(
        "/recommend latency by rollout arm (p50, p99)",
        "Latency in the chain per rollout arm (recserve_arm_latency_ms): a canary's against the champion's.",
        "ms",
        quantiles("ray_recserve_arm_latency_ms", "arm", 'arm=~"$arm"'),
        x=12,
        y=0,
    ),
    PanelSpec(
        "Stage latency (p50, p99)",
        "Each stage of the chain (recserve_stage_latency_ms): features, cf, content, blend, rules.",
        "ms",
        quantiles("ray_recserve_stage_latency_ms", "stage", ""),
        x=0,
        y=8,
    ),
    PanelSpec(
        "Requests by route and status",
        "Requests per second the ingress answered (recserve_requests), by route and HTTP status.",
        "reqps",
        (
            Query(
                f'sum by (route, status) (rate(ray_recserve_requests_total{{route=~"$route"}}[{RATE}]))',
                "{{route}} {{status}}",
            ),
        ),
        x=12,
        y=8,
    ),
    PanelSpec(
        "Fallbacks by reason",
        "Degraded answers per second by reason (recserve_fallbacks): a stage that failed or missed its deadline, "
        "an empty or unreachable feature store, internal_error.",
        "reqps",
        (Query(f"sum by (reason) (rate(ray_recserve_fallbacks_total[{RATE}]))", "{{reason}}"),),
        x=0,
        y=16,
    ),
    PanelSpec(
        "Shedding (503) and requests in flight",
        "Requests shed with 503 + Retry-After per second, and requests in flight per replica (recserve_in_flight): "
        "shedding starts when a replica reaches max_in_flight.",
        "short",
        (
            Query(f'sum(rate(ray_recserve_requests_total{{status="503"}}[{RATE}]))', "shed (503) /s"),
            Query("max by (replica) (ray_recserve_in_flight)", "in flight {{replica}}"),
        ),
        x=12,
        y=16,
    ),
    PanelSpec(
        "Replicas",
        "Healthy replicas per deployment, as Serve's controller counts them (ray_serve_deployment_replica_healthy).",
        "short",
        (
            Query(
                'sum by (deployment) (ray_serve_deployment_replica_healthy{application="recserve"})',
                "{{deployment}}",
            ),
        ),
        x=0,
        y=24,
        extra={"min": 0},
    ),
    PanelSpec(
        "Rollout: share of users per arm, and rollbacks",
        "Percent of users each arm serves now (recserve_arm_share; a rolled-back canary's goes to 0), and the "
        "canary guard's rollbacks by arm and reason (recserve_rollbacks; deploy/alerts.yml RecserveRolledBack).",
        "short",
        (
            Query('max by (arm) (ray_recserve_arm_share{arm=~"$arm"})', "share % {{arm}}"),
            Query("sum by (arm, reason) (ray_recserve_rollbacks_total)", "rollbacks {{arm}} ({{reason}})"),
        ),
        x=12,
        y=24,
        extra={"min": 0},
    ),
    PanelSpec(
        "Answers and conversions per arm",
        "Answers per second by arm and bundle (recserve_arm_answers), and answers converted by an add_to_cart or "
        "purchase of a shown item within the attribution window (recserve_arm_conversions, "
        "pipeline/featurestore/outcomes.py).",
        "reqps",
        (
            Query(
                f'sum by (arm, version) (rate(ray_recserve_arm_answers_total{{arm=~"$arm"}}[{RATE}]))',
                "answers {{arm}} {{version}}",
            ),
            Query(
                f'sum by (arm, version) (rate(ray_recserve_arm_conversions_total{{arm=~"$arm"}}[{RATE}]))',
                "conversions {{arm}} {{version}}",
            ),
        ),
        x=0,
        y=32,
    ),
    PanelSpec(
        "Drift by feature (PSI, JS distance)",
        "Distance of each feature's serving distribution from training's: population stability index and "
        "Jensen-Shannon distance (recserve_drift_psi, recserve_drift_js_distance; deploy/alerts.yml RecserveDrift*).",
        "short",
        (
            Query('max by (feature) ({__name__=~"(ray_)?recserve_drift_psi"})', "PSI {{feature}}"),
            Query('max by (feature) ({__name__=~"(ray_)?recserve_drift_js_distance"})', "JS {{feature}}"),
        ),
        x=12,
        y=32,
        extra={"min": 0},
    ),
    PanelSpec(
        "Feature store health",
        "Replicas whose store watch sees the online store ok, empty or unreachable (recserve_feature_store_state, "
        "checked twice a second); its fallbacks show as feature_store_* reasons beside the others.",
        "short",
        (Query("sum by (state) (ray_recserve_feature_store_state)", "replicas {{state}}"),),
        x=0,
        y=40,
        w=24,
        extra={"min": 0},
    ),
)


def variable(name: str, label: str, query: str) -> gdash.QueryVariable:
    """A multi-value label filter; All matches every value (`.*`)."""
    return (
        gdash.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(model.VariableOption(selected=True, text="All", value="$__all"))
    )


def panel(spec: PanelSpec, panel_id: int) -> timeseries.Panel:
    built = (
        timeseries.Panel()
        .id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .grid_pos(model.GridPos(h=spec.h, w=spec.w, x=spec.x, y=spec.y))
        .fill_opacity(10)
        .legend(
            gcommon.VizLegendOptions()
            .show_legend(True)
            .display_mode(cmodel.LegendDisplayMode.TABLE)
            .placement(cmodel.LegendPlacement.BOTTOM)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .tooltip(gcommon.VizTooltipOptions().mode(cmodel.TooltipDisplayMode.MULTI).sort(cmodel.SortOrder.DESCENDING))
    )
    if "min" in spec.extra:
        built = built.min(spec.extra["min"])
    for ref, q in zip("ABCDEFGH", spec.queries, strict=False):
        built = built.with_target(gprom.Dataquery().ref_id(ref).expr(q.expr).legend_format(q.legend).range())
    return built


def build() -> dict:
    """The dashboard as Grafana's JSON model (a dict)."""
    board = (
        gdash.Dashboard("recserve")
        .uid(UID)
        .description("recserve serving: latency, fallbacks, shedding, replicas, rollouts, drift, feature store")
        .tags(["recserve"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(gdash.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(variable("route", "route", "label_values(ray_recserve_requests_total, route)"))
        .with_variable(variable("arm", "arm", "label_values(ray_recserve_arm_answers_total, arm)"))
    )
    for n, spec in enumerate(PANELS, 1):
        board = board.with_panel(panel(spec, n))
    return json.loads(JSONEncoder(sort_keys=True).encode(board.build()))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) deploy/grafana/dashboards/recserve.json.")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is not what this code makes")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'stale: run python -m pipeline.serve.dashboard'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(PANELS)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
