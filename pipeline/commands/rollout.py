"""`recserve rollout start|status|promote|rollback`: change the running application's arms (chain/rollout.py).

Each command reads the application's deployed config from Serve's controller, changes only the Ingress's
`user_config["rollout"]`, and deploys the config back through Serve's own declarative API (what `serve deploy` and
the dashboard's REST API call). A user_config change is a lightweight update in Serve: no replica restarts; each
replica loads the new bundles in the background, warms them and swaps (see chain/rollout.Rollout).

Serve's config API is guarded by access to the Ray cluster, not by the service's API keys; so each command first
asks the service's GET /admin/rollout with the caller's admin key (`--key` or RECSERVE_API_KEY) and stops, changing
nothing, unless the service accepts it.

`start` refuses a bundle that fails verification, is not materialized in the application's feature store, or
whose offline NDCG@10 on the same split is below the champion's by more than the tolerance.

`status` prints, per arm: the share of answers (observed against the target weight), requests, p50/p99, error and
degraded rates (Ray's metrics, since the replicas started), and the online outcomes (Redis's counts, cluster-wide,
since the experiment's salt first answered; pipeline/featurestore/outcomes.py): answers, conversions, the hit rate
with its 95% Wilson interval, and Fisher's exact test (two-sided, alpha 0.05) of each arm against the champion
(models/hitrate.py); plus a sample-ratio check of the shares against the weights. `--json` prints the same as JSON.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chain.rollout import ArmSpec, Role, RolloutSpec
from models.bundle import Manifest, verified
from models.errors import ConfigError, RecserveError
from models.hitrate import ALPHA, CONFIDENCE, TEST_NAME, hit_rate, sample_ratio_p, versus_champion
from models.remote import is_uri
from pipeline.commands.serve import http_get
from pipeline.serve.args import local_bundle
from pipeline.serve.metrics import histogram_quantile
from settings import ServeSettings, StoreSettings

if TYPE_CHECKING:
    from pipeline.featurestore.outcomes import ArmCounts

APP = "recserve"
DRIVER_NICENESS = 10
# Reads the deployed config of every application (and Serve's HTTP options) and, given a rollout, deploys the same
# configs with the Ingress's user_config.rollout replaced. Prints the app's config as JSON.
_DRIVER = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, include_dashboard=False)
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema, ServeInstanceDetails
client = _get_global_client()
details = ServeInstanceDetails(**client.get_serve_details())
apps = {name: a.deployed_app_config for name, a in details.applications.items() if a.deployed_app_config}
app = apps.get(sys.argv[2])
if app is None:
    print(json.dumps({"error": f"no application {sys.argv[2]!r}; running: {sorted(apps)}"}))
    sys.exit(0)
rollout = json.loads(sys.argv[3])
if rollout is not None:
    for d in app.deployments:
        if d.name == "Ingress":
            d.user_config = {**(d.user_config or {}), "rollout": rollout}
            break
    else:
        print(json.dumps({"error": "the application has no Ingress deployment in its config"}))
        sys.exit(0)
    config = ServeDeploySchema(
        http_options=details.http_options.model_dump(exclude_unset=True) if details.http_options else {},
        applications=list(apps.values()),
    )
    client.deploy_apps(config)
print(json.dumps(app.model_dump(mode="json", exclude_unset=True)))
"""


def _driver(settings: ServeSettings, rollout: RolloutSpec | None, app: str = APP) -> dict[str, Any]:
    address = os.environ.get("RAY_ADDRESS") or f"127.0.0.1:{settings.ray_port}"
    payload = json.dumps(rollout.model_dump(mode="json") if rollout is not None else None)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _DRIVER, address, app, payload],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_ADDRESS": address},
            # An operator's command must not take the CPU from serving: importing Ray and connecting costs seconds.
            preexec_fn=lambda: os.nice(DRIVER_NICENESS),
        )
    except subprocess.TimeoutExpired:
        raise RecserveError(f"Ray at {address} did not answer within 120 s: is `recserve serve` running?") from None
    last = (out.stdout.strip().splitlines() or [""])[-1]
    if out.returncode != 0 or not last.startswith("{"):
        raise RecserveError(
            f"could not reach Serve at {address} ({(out.stderr.strip().splitlines() or ['no output'])[-1]}): start "
            "the service with `recserve serve`, or set RECSERVE_RAY_PORT / RAY_ADDRESS to its Ray"
        )
    config = json.loads(last)
    if "error" in config:
        raise RecserveError(f"{config['error']}: start it with `recserve serve`")
    return config


def require_admin(base: str, key: str | None) -> dict[str, Any]:
    """GET {base}/admin/rollout with `key` as the bearer key: the running rollout when the service accepts it as an
    admin key. Raises ConfigError (no key, or the service refuses it: 401 or 403, with the service's reason) or
    RecserveError (the service does not answer)."""
    if not key:
        raise ConfigError(
            "recserve rollout needs an API key with scope admin: pass --key KEY or set RECSERVE_API_KEY (create one "
            "with `recserve keys create --name NAME --scope admin`)"
        )
    code, body = http_get(f"{base}/admin/rollout", 10.0, {"Authorization": f"Bearer {key}"})
    try:
        detail = json.loads(body) if body.startswith("{") else {}
    except json.JSONDecodeError:
        detail = {}
    if code in (401, 403):
        raise ConfigError(f"{base}/admin/rollout refused the key ({code}): {detail.get('error', body[:200])}")
    if code != 200:
        raise RecserveError(
            f"{base}/admin/rollout answered {code or 'nothing'} {detail.get('error', body[:200])}: is the service "
            f"up at {base}? (start it with `recserve serve`, or pass --url)"
        )
    return detail


def _ingress_user_config(config: dict[str, Any]) -> dict[str, Any]:
    return next((d.get("user_config") or {} for d in config.get("deployments", []) if d.get("name") == "Ingress"), {})


def current_spec(config: dict[str, Any], base: str) -> RolloutSpec:
    """The rollout the application's config names; without one, the bundle its replicas serve (the one the app was
    deployed with) as the only, champion, arm."""
    spec = _ingress_user_config(config).get("rollout")
    if spec is not None:
        return RolloutSpec.model_validate(spec)
    code, body = http_get(f"{base}/readyz", 5.0)
    arms = (json.loads(body) if body.startswith("{") else {}).get("arms") or {}
    champion = next((a.get("bundle") for a in arms.values() if a.get("role") == "champion"), None)
    if not champion:
        raise RecserveError(f"{base}/readyz answered {code} without the arms served: is the service up at {base}?")
    return RolloutSpec.single(str(champion))


def _store(config: dict[str, Any]) -> StoreSettings:
    return StoreSettings.model_validate((config.get("args") or {}).get("store") or {})


def _table(manifest: Manifest) -> str:
    systems = manifest.metrics.get("systems") or {}
    metrics = ("recall@10", "ndcg@10", "map@10", "coverage@10")
    lines = [f"  {'system':<12}" + "".join(f"{m:>13}" for m in metrics)]
    lines += [
        f"  {name:<12}" + "".join(f"{row.get(m, float('nan')):>13.4f}" for m in metrics)
        for name, row in systems.items()
    ]
    return "\n".join(lines)


def offline_gate(champion: Path, candidate: Path, tolerance: float) -> str:
    """Both bundles' offline tables, and the verdict; raises ConfigError when the candidate's blend NDCG@10 is below
    the champion's by more than `tolerance` (absolute), or the two were not evaluated on the same split."""
    _, champ, _ = verified(champion)
    _, cand, _ = verified(candidate)
    if champ.split != cand.split:
        raise ConfigError(
            f"{cand.version} was evaluated on split {cand.split}, the champion {champ.version} on {champ.split}: "
            "retrain the candidate with `recserve train --cutoff` at the champion's cutoff"
        )
    try:
        ndcg = [float(m.metrics["systems"]["blend"]["ndcg@10"]) for m in (champ, cand)]
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"{champ.version} or {cand.version} has no offline table in its manifest: run `recserve evaluate` on it"
        ) from None
    text = (
        f"champion {champ.version}:\n{_table(champ)}\ncandidate {cand.version}:\n{_table(cand)}\n"
        f"blend NDCG@10: candidate {ndcg[1]:.4f}, champion {ndcg[0]:.4f}, tolerance {tolerance:.4f}"
    )
    if ndcg[1] < ndcg[0] - tolerance:
        raise ConfigError(
            f"{text}\nthe candidate ranks worse offline than the champion by more than the tolerance: improve it, "
            "or pass a larger --tolerance"
        )
    return text


def _wait_serving(base: str, spec: RolloutSpec, timeout_s: float) -> dict[str, Any]:
    """Until /readyz, asked through the client URL, shows the spec's arms serving on 10 answers in a row (the
    balancer spreads them over the replicas); the last detail."""
    want = {a.name: a.weight for a in spec.arms}
    deadline, streak, detail = time.monotonic() + timeout_s, 0, {}
    while time.monotonic() < deadline:
        code, body = http_get(f"{base}/readyz", 5.0)
        detail = json.loads(body) if body.startswith("{") else {}
        arms = {name: a.get("weight") for name, a in (detail.get("arms") or {}).items()}
        streak = streak + 1 if code == 200 and detail.get("rollout") == "serving" and arms == want else 0
        if streak >= 10:
            return detail
        time.sleep(0.2 if streak else 0.5)
    raise RecserveError(f"the replicas did not all serve the new arms within {timeout_s:.0f} s; last /readyz: {detail}")


def deploy(spec: RolloutSpec, base: str, timeout_s: float, settings: ServeSettings) -> dict[str, Any]:
    _driver(settings, spec)
    return _wait_serving(base, spec, timeout_s)


def start(
    bundle: str,
    canary: float | None,
    ab: float | None,
    salt: str | None,
    tolerance: float,
    base: str,
    settings: ServeSettings,
    shadow: float | None = None,
) -> RolloutSpec:
    """The current champion plus `bundle` as a canary (or an A/B challenger) at the given percent of users, and/or
    as the shadow of `shadow` percent of requests."""
    config = _driver(settings, None)
    current = current_spec(config, base)
    champion = current.champion
    # A URI stays the arm's name for the bundle (each replica fetches it on its node); a path becomes absolute.
    ref = bundle if is_uri(bundle) else str(Path(bundle).resolve())
    path, manifest, _ = verified(local_bundle(ref))
    from pipeline.featurestore.store import require_materialized  # Feast's import takes seconds: `start` only

    require_materialized(_store(config), manifest.version, path)
    print(offline_gate(local_bundle(champion.bundle), path, tolerance), flush=True)
    share = canary if canary is not None else ab
    arms = [champion.model_copy(update={"weight": 100.0 - (share or 0.0)})]
    if share is not None:
        role: Role = "canary" if canary is not None else "challenger"
        arms.append(ArmSpec(name=role, bundle=ref, weight=share, role=role))
    if shadow is not None:
        arms.append(ArmSpec(name="shadow", bundle=ref, weight=shadow, role="shadow"))
    spec = RolloutSpec(
        salt=salt or f"{manifest.version}",
        arms=tuple(arms),
        guard=current.guard,
        shadow_limits=current.shadow_limits,
    )
    deploy(spec, base, 300.0, settings)
    return spec


def promote(base: str, settings: ServeSettings) -> RolloutSpec:
    """The one challenger or canary becomes the champion, for every user."""
    spec = current_spec(_driver(settings, None), base)
    others = [a for a in spec.users_arms if a.role != "champion"] or [a for a in spec.arms if a.role == "shadow"]
    if len(others) != 1:
        raise ConfigError(f"promote needs exactly one challenger, canary or shadow; the rollout has {len(others)}")
    promoted = others[0].model_copy(update={"weight": 100.0, "role": "champion", "name": "champion", "knobs": None})
    new = RolloutSpec(salt=spec.salt, arms=(promoted,), guard=spec.guard, shadow_limits=spec.shadow_limits)
    deploy(new, base, 300.0, settings)
    return new


def rollback(base: str, settings: ServeSettings) -> RolloutSpec:
    """Every user back on the champion."""
    spec = current_spec(_driver(settings, None), base)
    champion = spec.champion.model_copy(update={"weight": 100.0})
    new = RolloutSpec(salt=spec.salt, arms=(champion,), guard=spec.guard, shadow_limits=spec.shadow_limits)
    deploy(new, base, 300.0, settings)
    return new


def arm_stats(metrics_url: str) -> dict[str, dict[str, float]]:
    """Per arm, summed over replicas since they started: answers, the degraded and error shares (errors: answers
    whose chain failed and fell to the popularity rung, `recserve_arm_errors`), and p50/p99 of the chain's latency
    (ms, interpolated within histogram buckets as PromQL's histogram_quantile does). Empty when the metrics
    endpoint does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    code, text = http_get(metrics_url, 5.0)
    if code != 200:
        return {}
    answers: dict[str, list[float]] = {}
    errors: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            arm = sample.labels.get("arm")
            if arm is None:
                continue
            if sample.name == "ray_recserve_arm_answers_total":
                row = answers.setdefault(arm, [0.0, 0.0])
                row[0] += sample.value
                row[1] += sample.value if sample.labels.get("degraded") == "true" else 0.0
            elif sample.name == "ray_recserve_arm_errors_total":
                errors[arm] = errors.get(arm, 0.0) + sample.value
            elif sample.name == "ray_recserve_arm_latency_ms_bucket":
                le = float(sample.labels["le"])
                buckets.setdefault(arm, {})[le] = buckets.setdefault(arm, {}).get(le, 0.0) + sample.value
    out = {}
    for arm, (n, degraded) in answers.items():
        cum = sorted(buckets.get(arm, {}).items())
        out[arm] = {
            "answers": n,
            "degraded": degraded / n if n else float("nan"),
            "errors": errors.get(arm, 0.0) / n if n else float("nan"),
            "p50": histogram_quantile(cum, 0.5),
            "p99": histogram_quantile(cum, 0.99),
        }
    return out


def outcome_counts(store: StoreSettings, salt: str) -> list[ArmCounts] | str:
    """The experiment's answers and conversions per arm and version from Redis (cluster-wide, since the salt's
    first answer); the reason as text when Redis does not answer."""
    from pipeline.featurestore.client import REDIS_ERRORS, redis_client
    from pipeline.featurestore.outcomes import read_counts

    try:
        return read_counts(redis_client(store), store.project, salt)
    except REDIS_ERRORS as exc:
        return f"Redis at {store.redis} did not answer ({exc})"


def _nan_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def status_report(
    spec: RolloutSpec,
    serving: dict[str, Any],
    stats: dict[str, dict[str, float]],
    counts: list[ArmCounts] | str,
    state: str = "serving",
) -> dict[str, Any]:
    """Per arm: target and observed share of answers, requests, p50/p99, error and degraded rates (from `stats`,
    since the replicas started), answers, conversions and hit rate with its Wilson 95% interval (from `counts`,
    Redis's, since the experiment started), and Fisher's exact test (two-sided, alpha 0.05) against the champion
    (models/hitrate.py). An arm's outcome counts are those of the version it serves now (`serving`, /readyz's arms),
    or of all its versions when that is unknown. Shares are fractions; rates NaN-free (None when unknown)."""
    rows = counts if isinstance(counts, list) else []
    by_arm: dict[str, tuple[int, int]] = {}
    for a in spec.arms:
        version = (serving.get(a.name) or {}).get("model_version")
        mine = [c for c in rows if c.arm == a.name and (version is None or c.version == version)]
        by_arm[a.name] = (sum(c.answers for c in mine), sum(c.converted for c in mine))
    total = sum(n for n, _ in by_arm.values())
    rates = {name: hit_rate(k, n) for name, (n, k) in by_arm.items()}
    champion = rates[spec.champion.name]
    arms = []
    for a in spec.arms:
        st, h = stats.get(a.name, {}), rates[a.name]
        row: dict[str, Any] = {
            "arm": a.name,
            "role": a.role,
            "model_version": (serving.get(a.name) or {}).get("model_version"),
            "bundle": a.bundle,
            "target_share": a.weight / 100.0,
            "observed_share": by_arm[a.name][0] / total if total else None,
            "requests": st.get("answers", 0.0),
            "p50_ms": _nan_none(st.get("p50", math.nan)),
            "p99_ms": _nan_none(st.get("p99", math.nan)),
            "error_rate": _nan_none(st.get("errors", math.nan)),
            "degraded_rate": _nan_none(st.get("degraded", math.nan)),
            "answers": h.answers,
            "conversions": h.converted,
            "hit_rate": _nan_none(h.rate),
            "hit_rate_ci95": [_nan_none(h.low), _nan_none(h.high)],
            "vs_champion": None,
        }
        if a.role != "champion":
            c = versus_champion(h, champion)
            row["vs_champion"] = {
                "difference": _nan_none(c.difference),
                "p_value": _nan_none(c.p_value),
                "significant": c.significant,
            }
        arms.append(row)
    srm = sample_ratio_p([by_arm[a.name][0] for a in spec.arms], [a.weight for a in spec.arms])
    return {
        "salt": spec.salt,
        "state": state,
        "test": TEST_NAME,
        "alpha": ALPHA,
        "confidence": CONFIDENCE,
        "sample_ratio_p": _nan_none(srm),
        "outcomes": "ok" if isinstance(counts, list) else counts,
        "arms": arms,
    }


def _fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def render(report: dict[str, Any]) -> str:
    """`status_report` as the table `recserve rollout status` prints."""
    lines = [f"rollout (salt {report['salt']!r}), replica state: {report['state']}"]
    lines.append(
        f"  {'arm':<12}{'role':<11}{'target':>7}{'share':>7}{'requests':>9}{'p50 ms':>7}{'p99 ms':>7}{'errors':>7}"
        f"{'degr.':>7}{'answers':>8}{'conv.':>7}{'hit rate [95% CI]':>24}{'vs champion':>30}  "
        f"{'model_version':<18}bundle"
    )
    for a in report["arms"]:
        low, high = a["hit_rate_ci95"]
        hit = "-" if a["hit_rate"] is None else f"{a['hit_rate']:.3f} [{low:.3f}, {high:.3f}]"
        vs = a["vs_champion"]
        if vs is None:
            versus = "(champion)"
        elif vs["p_value"] is None:
            versus = "no data"
        else:
            verdict = "significant" if vs["significant"] else "n.s."
            p = "p<0.001" if vs["p_value"] < 0.001 else f"p={vs['p_value']:.3f}"
            versus = f"{vs['difference']:+.3f} {p} {verdict}"
        lines.append(
            f"  {a['arm']:<12}{a['role']:<11}{a['target_share']:>7.1%}{_fmt(a['observed_share'], '.1%'):>7}"
            f"{a['requests']:>9.0f}{_fmt(a['p50_ms'], '.1f'):>7}{_fmt(a['p99_ms'], '.1f'):>7}"
            f"{_fmt(a['error_rate'], '.2%'):>7}{_fmt(a['degraded_rate'], '.2%'):>7}{a['answers']:>8}"
            f"{a['conversions']:>7}{hit:>24}{versus:>30}  {a['model_version'] or '-':<18}{a['bundle']}"
        )
    srm = report["sample_ratio_p"]
    lines.append(
        f"  hit rate = answers converted by an add_to_cart or purchase of a shown item within the attribution window "
        f"/ answers; {report['confidence']:.0%} Wilson intervals; {report['test']}, of each arm vs the champion at "
        f"alpha {report['alpha']}; sample-ratio check p={_fmt(srm, '.3f')} (below 0.001: the assignment is broken)"
    )
    if report["outcomes"] != "ok":
        lines.append(f"  outcomes unavailable: {report['outcomes']}")
    lines.append(
        "  (share, answers, conversions: Redis, cluster-wide since the salt's first answer; requests, latency, "
        "errors and degraded share: Ray's metrics agent, since the replicas started)"
    )
    return "\n".join(lines)


def status(base: str, settings: ServeSettings, as_json: bool = False) -> str:
    """The table (or, with `as_json`, the JSON) of `status_report` for the running application."""
    config = _driver(settings, None)
    spec = current_spec(config, base)
    code, body = http_get(f"{base}/readyz", 5.0)
    detail = json.loads(body) if body.startswith("{") else {}
    stats = arm_stats(f"http://127.0.0.1:{settings.metrics_port}/metrics")
    counts = outcome_counts(_store(config), spec.salt)
    report = status_report(
        spec, detail.get("arms") or {}, stats, counts, detail.get("rollout", f"unreachable ({code})")
    )
    return json.dumps(report, indent=2) if as_json else render(report)
