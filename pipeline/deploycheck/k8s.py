"""Offline checks of the KubeRay manifests in deploy/k8s/: what `kubectl apply` and the KubeRay operator would
refuse, and what would leave a Serve replica never scheduled, found before a cluster exists.

`check_overlay(path)` renders an overlay with `kubectl kustomize` (offline) and runs, on the rendered objects:

- `crd`: the RayService against KubeRay's CRD (`ray.io_rayservices.yaml`, version v1, from the shared folder beside
  the repository: see `crd_path`), made strict: an object schema that lists `properties` and does not say
  `x-kubernetes-preserve-unknown-fields` admits no other field, as the API server's pruning would drop them silently;
  `x-kubernetes-int-or-string` admits an integer or a string. Plus the KubeRay v1.7 webhook's group rules
  (ray-operator/controllers/ray/utils/validation.go: no rayStartParams['labels']; resources given one way only).
- `serve`: `spec.serveConfigV2` against Ray's own `ray.serve.schema.ServeDeploySchema`, and no field that schema
  would ignore (it admits unknown fields for forward compatibility, so a misspelt `autoscaling_confg` is dropped).
- `app`: each application's import_path resolves (read from source, not imported) and the project's builder takes
  its `args` (`pipeline.serve.args.AppArgs`, extra=forbid). That import is heavy (torch, Feast: ~15 s on 2 cores)
  but loads no model.
- `fit`: each deployment's label_selector matches a group, one replica's num_cpus/num_gpus/memory fit one node of a
  matching group, and its max replicas (with the others pinned to the same group) fit the group's max nodes. A
  group's resources follow KubeRay's rule (pod.go, generateRayStartCommand): rayStartParams num-cpus / num-gpus /
  memory, else the Ray container's limits (CPU rounded up; a GPU from a limit whose name ends in "gpu").
- `k8s`: every built-in object (and the RayService's serveService, as a Service) with kubernetes-validate's strict
  schemas for Kubernetes 1.32 (kubectl's version here).
- `podmonitor`: PodMonitor is a prometheus-operator CRD that kubernetes-validate does not ship, and no PyPI package
  here ships its schema strictly (cloudcoil's generated models ignore unknown fields), so it is checked only by the
  structural schema below, a strict subset of monitoring.coreos.com/v1 written from prometheus-operator's API
  reference, and by cross-checks: its selector picks the Ray pods, its port names a port on every Ray container.

Each finding is a `Problem` naming the check, where, and the fix; an empty list means the overlay passed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import jsonschema
import yaml

from models.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
OVERLAYS_DIR = REPO_ROOT / "deploy" / "k8s" / "overlays"
OVERLAYS = ("gpu", "cpu-only")
CRD_FILE = "ray.io_rayservices.yaml"
CRD_VERSION = "v1"
K8S_VERSION = "1.32"  # kubectl v1.32 renders here; kubernetes-validate's schemas of that release
POOL_LABEL = "recserve.io/pool"


@dataclass(frozen=True)
class Problem:
    """One finding: which check (crd, kuberay, serve, app, fit, k8s, podmonitor), where, and what to fix."""

    check: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.where}: {self.message}"


# --- rendering -------------------------------------------------------------------------------------------------


def render(overlay: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize <overlay>` renders (offline: kustomize is built into kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ConfigError(
            "kubectl is not on PATH: install kubectl 1.27 or newer (its built-in kustomize renders `replacements`; "
            "Debian's kubernetes-client 1.20 is too old) to render deploy/k8s overlays"
        )
    out = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise ConfigError(f"kubectl kustomize {overlay} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def crd_path(repo_root: Path = REPO_ROOT) -> Path | None:
    """KubeRay's RayService CRD, read from `<repo>/../shared/k8s/` (kept out of the repository: it is KubeRay's file,
    1 MB); None when that folder is absent."""
    path = repo_root.parent / "shared" / "k8s" / CRD_FILE
    return path if path.is_file() else None


# --- the RayService against its CRD ------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 structural schema as a JSON schema that rejects unknown fields: every object schema
    with `properties` and no `x-kubernetes-preserve-unknown-fields` gets additionalProperties: false, and
    `x-kubernetes-int-or-string` admits an integer or a string."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if out.get("nullable"):
        kind = out.get("type")
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
    return out


@functools.lru_cache(maxsize=4)
def crd_validator(path: Path) -> jsonschema.Draft7Validator:
    """The strict validator of the CRD's `v1` openAPIV3Schema."""
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if CRD_VERSION not in versions:
        raise ConfigError(f"{path} serves no version {CRD_VERSION} (it has {sorted(versions)}): use KubeRay >= 1.0's")
    return jsonschema.Draft7Validator(strict(versions[CRD_VERSION]["schema"]["openAPIV3Schema"]))


def _where(error: jsonschema.ValidationError, root: str) -> str:
    path = root
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def check_crd(rayservice: dict[str, Any], crd: Path) -> list[Problem]:
    """The RayService against the strict CRD schema, then the KubeRay webhook's group rules."""
    name = f"RayService/{rayservice.get('metadata', {}).get('name')}"
    problems = [
        Problem("crd", _where(e, name), e.message)
        for e in sorted(crd_validator(crd).iter_errors(rayservice), key=lambda e: list(map(str, e.absolute_path)))
    ]
    cluster = rayservice.get("spec", {}).get("rayClusterConfig", {})
    specs = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
    specs += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
    for where, group in specs:
        params = group.get("rayStartParams") or {}
        if "labels" in params:
            problems.append(
                Problem(
                    "kuberay",
                    f"{name}.spec.rayClusterConfig.{where}",
                    "rayStartParams['labels'] is refused by "
                    "KubeRay v1.7: move the labels to the group's top-level `labels`",
                )
            )
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append(
                Problem(
                    "kuberay",
                    f"{name}.spec.rayClusterConfig.{where}",
                    "resources are given both in rayStartParams and in `resources`, which KubeRay refuses: keep one",
                )
            )
    return problems


# --- the serve config --------------------------------------------------------------------------------------------


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    """The parsed `spec.serveConfigV2` (a YAML string in the CRD)."""
    text = rayservice.get("spec", {}).get("serveConfigV2")
    if not isinstance(text, str):
        raise ConfigError("RayService spec.serveConfigV2 is missing or not a string: it holds the Serve config YAML")
    parsed = yaml.safe_load(text)
    if not isinstance(parsed, dict):
        raise ConfigError("RayService spec.serveConfigV2 is not a YAML mapping: write the Serve config there")
    return parsed


def _models_in(annotation: Any) -> list[type]:
    """The pydantic models an annotation holds directly, in an Optional/Union or a list (not a dict's values)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, list, tuple) or type(annotation).__name__ == "UnionType":
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    return []


def unknown_fields(model: type, data: Any, where: str) -> Iterator[str]:
    """Paths of `data`'s keys that `model` (a pydantic model) does not declare, recursively: the fields a model
    that admits extras would silently ignore."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields  # type: ignore[attr-defined]
    by_name = {**{f.alias: f for f in fields.values() if f.alias}, **fields}
    for key, value in data.items():
        field = by_name.get(key)
        if field is None:
            yield f"{where}.{key}"
            continue
        for sub in _models_in(field.annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                yield from unknown_fields(sub, item, f"{where}.{key}" + (f"[{i}]" if isinstance(value, list) else ""))


def check_serve(config: dict[str, Any]) -> list[Problem]:
    """The Serve config against Ray's ServeDeploySchema, then for fields that schema would ignore."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    where = "spec.serveConfigV2"
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [
            Problem("serve", f"{where}." + ".".join(map(str, e["loc"])), f"{e['msg']} (given {e.get('input')!r})")
            for e in exc.errors()
        ]
    # The schema takes autoscaling_config as any dict (Union[Dict, AutoscalingConfig]); Serve validates it only when
    # it deploys, so a min_replicas above max_replicas would pass here: validate it as Serve will.
    problems = []
    for a, app in enumerate(config.get("applications") or []):
        for d, dep in enumerate(app.get("deployments") or []):
            auto = dep.get("autoscaling_config")
            if isinstance(auto, dict):
                try:
                    AutoscalingConfig.model_validate(auto)
                except ValidationError as exc:
                    problems += [
                        Problem("serve", f"{where}.applications[{a}].deployments[{d}].autoscaling_config", e["msg"])
                        for e in exc.errors()
                    ]
    return problems + [
        Problem("serve", path, "Ray Serve does not know this field and would ignore it: fix its spelling or drop it")
        for path in unknown_fields(ServeDeploySchema, config, where)
    ]


def _defines(import_path: str) -> str | None:
    """None when `module:attr` names a top-level definition in the project's source (read, not imported: importing
    the app module loads Ray Serve and the deployments); else what is wrong."""
    module, _, attr = import_path.partition(":")
    if not attr:
        module, _, attr = import_path.rpartition(".")
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return f"no module {module!r} in this environment"
    tree = ast.parse(Path(spec.origin).read_text())
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)} | {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
    }
    return None if attr in names else f"{module} defines no {attr!r}"


def check_app(config: dict[str, Any]) -> list[Problem]:
    """Each application's import_path exists, and the project's builder accepts its args (AppArgs, extra=forbid)."""
    from pydantic import ValidationError

    from pipeline.serve.args import AppArgs  # heavy (torch, Feast), but loads no model and connects to nothing

    problems = []
    for i, app in enumerate(config.get("applications") or []):
        where = f"spec.serveConfigV2.applications[{i}]"
        import_path = app.get("import_path", "")
        wrong = _defines(import_path)
        if wrong:
            problems.append(Problem("app", f"{where}.import_path", f"{import_path!r}: {wrong}"))
            continue
        if import_path != "pipeline.serve.app:build_app":
            continue  # another builder's args are its own business
        args = dict(app.get("args") or {})
        try:
            AppArgs.model_validate(args)
        except ValidationError as exc:
            problems += [
                Problem(
                    "app", f"{where}.args." + ".".join(map(str, e["loc"])), f"{e['msg']} (given {e.get('input')!r})"
                )
                for e in exc.errors()
            ]
    return problems


# --- fit: replicas against worker groups -------------------------------------------------------------------------

_SUFFIX = {
    "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "16Gi", "2", 1e3) as a number."""
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", value.strip())
    if not m:
        raise ConfigError(f"{value!r} is not a Kubernetes quantity: write e.g. 500m, 4, 16Gi")
    return float(m[1]) * _SUFFIX.get(m[2] or "", 1.0)


@dataclass(frozen=True)
class Group:
    """A Ray node group as the scheduler sees one node of it, and how many nodes it may have."""

    name: str
    labels: dict[str, str]
    cpus: float
    gpus: float
    memory: float  # bytes; 0 when neither rayStartParams nor a limit says (Ray then uses what the node has)
    max_nodes: int


def groups(rayservice: dict[str, Any]) -> list[Group]:
    """The head and worker groups, with each node's Ray resources by KubeRay's rule."""
    cluster = rayservice.get("spec", {}).get("rayClusterConfig", {})
    autoscaled = bool(cluster.get("enableInTreeAutoscaling"))
    out = []
    specs = [("head", cluster.get("headGroupSpec") or {}, 1)]
    for g in cluster.get("workerGroupSpecs") or []:
        nodes = (g.get("maxReplicas", 2**31 - 1) if autoscaled else g.get("replicas", 0)) * g.get("numOfHosts", 1)
        specs.append((g.get("groupName", "?"), g, nodes))
    for name, spec, nodes in specs:
        params = spec.get("rayStartParams") or {}
        containers = spec.get("template", {}).get("spec", {}).get("containers") or [{}]
        res = containers[0].get("resources") or {}  # KubeRay's Ray container is the first
        limits, requests = res.get("limits") or {}, res.get("requests") or {}
        cpu = params.get("num-cpus") or limits.get("cpu") or requests.get("cpu") or 0
        gpu = params.get("num-gpus") or next((v for k, v in limits.items() if k.endswith("gpu")), 0)
        memory = params.get("memory") or limits.get("memory") or 0
        cpus = float(params["num-cpus"]) if "num-cpus" in params else math.ceil(quantity(cpu))
        gpus = float(params["num-gpus"]) if "num-gpus" in params else math.ceil(quantity(gpu))
        out.append(Group(name, dict(spec.get("labels") or {}), cpus, gpus, quantity(memory), int(nodes)))
    return out


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a Ray label_selector picks a node with `labels`: `value`, `!value`, `in(a, b)`, `!in(a, b)`."""
    for key, cond in selector.items():
        negate = cond.startswith("!")
        cond = cond[1:] if negate else cond
        m = re.fullmatch(r"in\((.*)\)", cond)
        wanted = {v.strip() for v in m[1].split(",")} if m else {cond}
        if (labels.get(key) in wanted) == negate:
            return False
    return True


def _max_replicas(deployment: dict[str, Any]) -> int:
    auto = deployment.get("autoscaling_config") or {}
    if "max_replicas" in auto:
        return int(auto["max_replicas"])
    replicas = deployment.get("num_replicas", 1)
    return int(replicas) if isinstance(replicas, int) else 100  # "auto": Serve's default autoscaling maximum


def check_fit(rayservice: dict[str, Any], config: dict[str, Any]) -> list[Problem]:
    """Every deployment's selector matches a group; one replica fits one node of a matching group; and the replicas
    pinned to a group at their maximum fit its maximum nodes (a necessary condition, not a bin packing)."""
    pools = groups(rayservice)
    problems: list[Problem] = []
    pinned: dict[str, list[tuple[str, int, tuple[float, float, float]]]] = {}
    for a, app in enumerate(config.get("applications") or []):
        for d, dep in enumerate(app.get("deployments") or []):
            where = f"spec.serveConfigV2.applications[{a}].deployments[{d}] ({dep.get('name')})"
            opts = dep.get("ray_actor_options") or {}
            # Serve's defaults: a replica asks for 1 CPU, no GPU, no reserved memory.
            need = (float(opts.get("num_cpus", 1)), float(opts.get("num_gpus", 0)), float(opts.get("memory", 0)))
            selector = opts.get("label_selector") or {}
            matching = [g for g in pools if selects(selector, g.labels) and g.max_nodes > 0]
            if not matching:
                have = ", ".join(f"{g.name} {g.labels}" for g in pools)
                problems.append(
                    Problem(
                        "fit",
                        where,
                        f"label_selector {selector} matches no group (groups: {have}): its replicas "
                        f"would never be scheduled; select one of the groups' {POOL_LABEL} values",
                    )
                )
                continue
            fitting = [g for g in matching if all(n <= c or n == 0 for n, c in zip(need, _capacity(g), strict=True))]
            if not fitting:
                have = "; ".join(f"{g.name}: {_show(_capacity(g))}" for g in matching)
                problems.append(
                    Problem(
                        "fit",
                        where,
                        f"one replica asks for {_show(need)}, more than one node of any group it "
                        f"selects has ({have}): lower its ray_actor_options or enlarge the group",
                    )
                )
                continue
            if len(fitting) == 1:
                pinned.setdefault(fitting[0].name, []).append((str(dep.get("name")), _max_replicas(dep), need))
    for group in pools:
        entries = pinned.get(group.name, [])
        # Memory in GiB, so the message reads; a group without a memory figure holds any.
        for i, (what, unit) in enumerate((("CPUs", 1), ("GPUs", 1), ("GiB of memory", 2**30))):
            total = sum(n * need[i] for _, n, need in entries) / unit
            room = group.max_nodes * _capacity(group)[i] / unit
            if total > room:
                names = ", ".join(f"{name} {n}x{need[i] / unit:g}" for name, n, need in entries if need[i])
                problems.append(
                    Problem(
                        "fit",
                        f"group {group.name}",
                        f"at their max replicas the deployments pinned here ask for {total:g} {what} ({names}), more "
                        f"than its {group.max_nodes} nodes hold ({room:g}): raise the group's maxReplicas or lower "
                        "the deployments' max_replicas",
                    )
                )
    return problems


def _capacity(group: Group) -> tuple[float, float, float]:
    return group.cpus, group.gpus, group.memory if group.memory else math.inf


def _show(res: tuple[float, float, float]) -> str:
    memory = "any memory" if math.isinf(res[2]) else f"{res[2] / 2**30:g} GiB"
    return f"{res[0]:g} CPU, {res[1]:g} GPU, {memory}"


def check_group_limits(rayservice: dict[str, Any]) -> list[Problem]:
    """A group's rayStartParams must not promise Ray more than its container's limits allow (Ray would schedule
    replicas the pod cannot run)."""
    problems = []
    cluster = rayservice.get("spec", {}).get("rayClusterConfig", {})
    for name, spec in [("head", cluster.get("headGroupSpec") or {})] + [
        (g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs") or []
    ]:
        params = spec.get("rayStartParams") or {}
        containers = spec.get("template", {}).get("spec", {}).get("containers") or [{}]
        limits = (containers[0].get("resources") or {}).get("limits") or {}
        for param, limit in (("num-cpus", limits.get("cpu")), ("memory", limits.get("memory"))):
            if param in params and limit is not None and quantity(params[param]) > quantity(limit):
                problems.append(
                    Problem(
                        "fit",
                        f"group {name}",
                        f"rayStartParams {param}={params[param]} exceeds the container's "
                        f"limit {limit}: lower it or raise the limit",
                    )
                )
    return problems


# --- built-in objects and the PodMonitor -------------------------------------------------------------------------


def check_k8s(obj: dict[str, Any], where: str | None = None) -> list[Problem]:
    """A built-in object against kubernetes-validate's strict schemas for Kubernetes K8S_VERSION."""
    import kubernetes_validate

    where = where or f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [Problem("k8s", _where(exc, where), exc.message)]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [Problem("k8s", where, f"{exc.message}: use a built-in kind, or add a check of its own here")]
    return []


_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                            "uppercase", "keepequal", "dropequal", "Replace", "Keep", "Drop", "HashMod", "LabelMap",
                            "LabelDrop", "LabelKeep", "Lowercase", "Uppercase", "KeepEqual", "DropEqual"]},
    },
}  # fmt: skip
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
             r"(([0-9]+)s)?(([0-9]+)ms)?)$"}  # fmt: skip
# A strict subset of prometheus-operator's PodMonitor (monitoring.coreos.com/v1), written from its API reference:
# a real field left out here fails too; add it after checking that reference.
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS,
                           "annotations": _LABELS},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": _LABELS,
                        "matchExpressions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["key", "operator"],
                                "properties": {"key": {"type": "string"},
                                               "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                               "values": {"type": "array", "items": {"type": "string"}}},
                            },
                        },
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                        },
                    },
                },
            },
        },
    },
}  # fmt: skip


def _pod_templates(rayservice: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster = rayservice.get("spec", {}).get("rayClusterConfig", {})
    out = [("head", (cluster.get("headGroupSpec") or {}).get("template") or {})]
    return out + [(g.get("groupName", "?"), g.get("template") or {}) for g in cluster.get("workerGroupSpecs") or []]


def check_podmonitor(monitor: dict[str, Any], rayservice: dict[str, Any] | None) -> list[Problem]:
    """The structural schema above, then: the selector picks every Ray pod and each endpoint's port is named on
    every Ray container (a scrape that finds no target fails silently in Prometheus)."""
    where = f"PodMonitor/{monitor.get('metadata', {}).get('name')}"
    problems = [
        Problem("podmonitor", _where(e, where), e.message)
        for e in jsonschema.Draft7Validator(PODMONITOR_SCHEMA).iter_errors(monitor)
    ]
    if problems or rayservice is None:
        return problems
    spec = monitor["spec"]
    wanted = spec["selector"].get("matchLabels") or {}
    for group, template in _pod_templates(rayservice):
        labels = (template.get("metadata") or {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in wanted.items()):
            problems.append(
                Problem(
                    "podmonitor",
                    f"{where}.spec.selector",
                    f"matchLabels {wanted} miss the {group} group's pods "
                    f"(labels {labels}): set the same labels on every Ray pod template",
                )
            )
            continue
        ports = {
            p.get("name") for c in (template.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []
        }
        for i, endpoint in enumerate(spec["podMetricsEndpoints"]):
            if "port" in endpoint and endpoint["port"] not in ports:
                problems.append(
                    Problem(
                        "podmonitor",
                        f"{where}.spec.podMetricsEndpoints[{i}].port",
                        f"{endpoint['port']!r} is "
                        f"not a port of the {group} group's containers ({sorted(filter(None, ports))})",
                    )
                )
    return problems


def check_endpoint(rayservice: dict[str, Any], config: dict[str, Any]) -> list[Problem]:
    """The serveService as a Service (strict), aimed at the port Serve's HTTP (HAProxy) listens on."""
    service = rayservice.get("spec", {}).get("serveService")
    if not service:
        return []
    where = "RayService.spec.serveService"
    problems = check_k8s({"apiVersion": "v1", "kind": "Service", **service}, where)
    port = (config.get("http_options") or {}).get("port", 8000)
    targets = [p.get("targetPort", p.get("port")) for p in (service.get("spec") or {}).get("ports") or []]
    if port not in targets:
        problems.append(
            Problem("k8s", f"{where}.spec.ports", f"no port targets Serve's HTTP port {port} (targets: {targets})")
        )
    return problems


# --- all of it ---------------------------------------------------------------------------------------------------


def check_rendered(objects: list[dict[str, Any]], crd: Path | None, app_args: bool = True) -> list[Problem]:
    """Every check on an overlay's rendered objects (crd=None skips the CRD schema only)."""
    rayservices = [o for o in objects if o.get("kind") == "RayService"]
    if len(rayservices) != 1:
        return [Problem("crd", "(overlay)", f"{len(rayservices)} RayServices rendered, not 1: keep exactly one")]
    rs = rayservices[0]
    problems = check_crd(rs, crd) if crd is not None else []
    try:
        config = serve_config(rs)
    except ConfigError as exc:
        return [*problems, Problem("serve", "spec.serveConfigV2", str(exc))]
    problems += check_serve(config)
    if app_args:
        problems += check_app(config)
    problems += check_fit(rs, config) + check_group_limits(rs) + check_endpoint(rs, config)
    for obj in objects:
        if obj.get("kind") == "PodMonitor":
            problems += check_podmonitor(obj, rs)
        elif obj.get("kind") != "RayService":
            problems += check_k8s(obj)
    return problems


def check_overlay(overlay: Path, crd: Path | None = None, app_args: bool = True) -> list[Problem]:
    """Render `overlay` and check it. Raises ConfigError when kubectl is missing or the render fails."""
    return check_rendered(render(overlay), crd if crd is not None else crd_path(), app_args)
