"""The KubeRay overlays pass every offline check, and each check fails on a mistake planted in the rendered objects.

Rendering needs kubectl (its built-in kustomize, offline); the CRD check needs KubeRay's CRD in <repo>/../shared/k8s/.
Without either, the tests that need it skip and say why, except in CI (CI=true), where they fail."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from pipeline.deploycheck import k8s

# In CI (CI=true) nothing skips: a missing kubectl or CRD fails the run instead of hiding the checks.
IN_CI = os.environ.get("CI") == "true"
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None and not IN_CI,
    reason="kubectl is not on PATH: nothing renders deploy/k8s (install kubectl >= 1.27)",
)
CRD = k8s.crd_path()
needs_crd = pytest.mark.skipif(
    CRD is None and not IN_CI,
    reason=f"no {k8s.CRD_FILE} in <repo>/../shared/k8s/ (KubeRay's CRD is read from there, not copied)",
)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if shutil.which("kubectl") is None and not IN_CI:
        pytest.skip("kubectl is not on PATH: nothing renders deploy/k8s (install kubectl >= 1.27)")
    return {name: k8s.render(k8s.OVERLAYS_DIR / name) for name in k8s.OVERLAYS}


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind)


def planted(objects: list[dict[str, Any]], change: Callable[[list[dict[str, Any]]], None]) -> list[k8s.Problem]:
    """The problems found after `change` plants a mistake in a copy of the rendered objects (AppArgs aside: that
    check has tests of its own, and importing it costs ~15 s)."""
    return k8s.check_rendered(planted_copy(objects, change), CRD, app_args=False)


def planted_copy(objects: list[dict[str, Any]], change: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    mutated = copy.deepcopy(objects)
    change(mutated)
    return mutated


def edit_serve(objects: list[dict[str, Any]], change: Callable[[dict[str, Any]], None]) -> None:
    rs = one(objects, "RayService")
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    change(config)
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(config)


def deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def checks(problems: list[k8s.Problem]) -> set[str]:
    return {p.check for p in problems}


# --- the overlays as committed -----------------------------------------------------------------------------------


@needs_crd
@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_overlay_passes_every_check(rendered, overlay):
    assert k8s.check_rendered(rendered[overlay], CRD, app_args=True) == []


def test_overlays_place_the_content_model(rendered):
    def content_pool(objects):
        config = k8s.serve_config(one(objects, "RayService"))
        return deployment(config, "ContentModel")["ray_actor_options"]["label_selector"][k8s.POOL_LABEL]

    gpu, cpu = rendered["gpu"], rendered["cpu-only"]
    assert content_pool(gpu) == "gpu" and content_pool(cpu) == "cpu"
    assert [g.name for g in k8s.groups(one(cpu, "RayService"))] == ["head", "cpu"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(cpu)
    head, _, gpu_group = k8s.groups(one(gpu, "RayService"))
    assert (head.cpus, head.labels) == (0, {k8s.POOL_LABEL: "head"})
    assert (gpu_group.gpus, gpu_group.cpus, gpu_group.memory) == (1, 8, 32 * 2**30)
    env = one(gpu, "ConfigMap")["data"]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


# --- planted mistakes: each check fails ---------------------------------------------------------------------------


@needs_crd
@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_crd_rejects_a_misspelt_field(rendered, overlay):
    def misspell(objects):
        cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
        cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")

    problems = planted(rendered[overlay], misspell)
    assert any(p.check == "crd" and "'workerGroupSpec' was unexpected" in p.message for p in problems)


@needs_crd
def test_crd_rejects_a_misspelt_field_deep_in_a_pod_template(rendered):
    def misspell(objects):
        container = one(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
            "containers"
        ][0]
        container["resource"] = container.pop("resources")

    problems = planted(rendered["gpu"], misspell)
    assert [p.where for p in problems if p.check == "crd"] == [
        "RayService/recserve.spec.rayClusterConfig.headGroupSpec.template.spec.containers[0]"
    ]


@needs_crd
@pytest.mark.parametrize(("port", "ok"), [(8000, True), ("serve", True), (True, False), (8.5, False)])
def test_crd_int_or_string(rendered, port, ok):
    def probe(objects):
        group = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        group["template"]["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/", "port": port}}

    problems = planted(rendered["gpu"], probe)
    assert (problems == []) is ok, problems


@needs_crd
def test_kuberay_refuses_labels_in_ray_start_params(rendered):
    def labels(objects):
        group = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        group["rayStartParams"]["labels"] = "recserve.io/pool=cpu"

    assert checks(planted(rendered["gpu"], labels)) == {"kuberay"}


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        # Out of ServeDeploySchema's range.
        (lambda c: c.update(proxy_location="Everywhere"), "proxy_location"),
        (lambda c: deployment(c, "Ingress").update(max_ongoing_requests=0), "max_ongoing_requests"),
        # Accepted by the schema as a plain dict; Serve refuses it only when it deploys.
        (lambda c: deployment(c, "Blender")["autoscaling_config"].update(min_replicas=9), "autoscaling_config"),
        # Fields the schema would silently ignore.
        (lambda c: deployment(c, "Blender").update(autoscaling_confg={"max_replicas": 2}), "autoscaling_confg"),
        (lambda c: deployment(c, "Blender")["autoscaling_config"].update(max_replica=2), "max_replica"),
    ],
)
def test_serve_config_mistakes(rendered, change, expect):
    problems = planted(rendered["gpu"], lambda objects: edit_serve(objects, change))
    assert checks(problems) == {"serve"} and any(expect in p.where for p in problems), problems


@pytest.mark.parametrize(
    ("field", "value", "asks"),
    [("num_cpus", 9, "9 CPU"), ("num_gpus", 2, "2 GPU"), ("memory", 40 * 2**30, "40 GiB")],
)
def test_fit_rejects_a_replica_larger_than_its_group(rendered, field, value, asks):
    def grow(config):
        deployment(config, "ContentModel")["ray_actor_options"][field] = value

    problems = planted(rendered["gpu"], lambda objects: edit_serve(objects, grow))
    assert [p.check for p in problems] == ["fit"]
    assert asks in problems[0].message and "gpu: 8 CPU, 1 GPU, 32 GiB" in problems[0].message


def test_fit_rejects_a_selector_that_matches_no_group(rendered):
    def gpu_in_cpu_only(config):
        deployment(config, "ContentModel")["ray_actor_options"]["label_selector"] = {k8s.POOL_LABEL: "gpu"}

    problems = planted(rendered["cpu-only"], lambda objects: edit_serve(objects, gpu_in_cpu_only))
    assert [p.check for p in problems] == ["fit"] and "matches no group" in problems[0].message


def test_fit_rejects_max_replicas_beyond_the_groups_nodes(rendered):
    def scale(config):
        deployment(config, "ContentModel")["autoscaling_config"]["max_replicas"] = 5  # 2 GPU nodes hold 4 halves

    problems = planted(rendered["gpu"], lambda objects: edit_serve(objects, scale))
    assert [(p.check, p.where) for p in problems] == [("fit", "group gpu")] and "2.5 GPUs" in problems[0].message


def test_fit_rejects_ray_start_params_above_the_container_limit(rendered):
    def promise(objects):
        group = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        group["rayStartParams"]["num-cpus"] = "16"

    problems = [p for p in planted(rendered["gpu"], promise) if p.where == "group cpu"]
    assert problems and "exceeds the container's limit 4" in problems[0].message


@pytest.mark.parametrize(
    ("kind", "change", "where"),
    [
        ("StatefulSet", lambda o: o["spec"].update(replica=1), "StatefulSet/recserve-redis.spec"),
        ("StatefulSet", lambda o: o["spec"].update(replicas="one"), "StatefulSet/recserve-redis.spec.replicas"),
        ("Service", lambda o: o["spec"]["ports"][0].update(prot=6379), "Service/recserve-redis.spec.ports[0]"),
        ("Secret", lambda o: o.update(stringdata={}), "Secret/recserve-s3"),  # the first Secret rendered
    ],
)
def test_k8s_schema_rejects_a_bad_field(rendered, kind, change, where):
    problems = planted(rendered["gpu"], lambda objects: change(one(objects, kind)))
    assert [(p.check, p.where) for p in problems] == [("k8s", where)], problems


def test_k8s_schema_checks_the_serve_service(rendered):
    def bad(objects):
        one(objects, "RayService")["spec"]["serveService"]["spec"]["type"] = 7

    problems = k8s.check_endpoint(one(planted_copy(rendered["gpu"], bad), "RayService"), {})
    assert [(p.check, p.where) for p in problems] == [("k8s", "RayService.spec.serveService.spec.type")]


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (lambda s: s.update(podMetricEndpoints=s.pop("podMetricsEndpoints")), "'podMetricEndpoints' was unexpected"),
        (lambda s: s["podMetricsEndpoints"][0].update(interval="10 seconds"), "does not match"),
        (lambda s: s["podMetricsEndpoints"][0].update(port="metric"), "'metric' is not a port"),
        (lambda s: s["selector"].update(matchLabels={"app.kubernetes.io/name": "ray"}), "miss the head group's pods"),
    ],
)
def test_podmonitor_structural_check(rendered, change, expect):
    problems = planted(rendered["gpu"], lambda objects: change(one(objects, "PodMonitor")["spec"]))
    assert checks(problems) == {"podmonitor"} and any(expect in p.message for p in problems), problems


# --- the app's own args (AppArgs: imports torch and Feast, loads no model) ------------------------------------------


@pytest.mark.parametrize(
    ("args", "where"),
    [
        ({"topology": "sharded"}, "args.topology"),
        ({"topology": "distributed", "bundel": "s3://recserve/bundles/v1/"}, "args.bundel"),
        ({"max_body_bytes": 10}, "args.max_body_bytes"),
    ],
)
def test_app_args_mistakes(rendered, args, where):
    config = k8s.serve_config(one(rendered["gpu"], "RayService"))
    config["applications"][0]["args"] = args
    problems = k8s.check_app(config)
    assert [p.check for p in problems] == ["app"] and problems[0].where.endswith(where), problems


def test_app_import_path_is_read_not_imported(rendered):
    config = k8s.serve_config(one(rendered["gpu"], "RayService"))
    config["applications"][0]["import_path"] = "pipeline.serve.app:build_ap"
    problems = k8s.check_app(config)
    assert [(p.check, p.message) for p in problems] == [
        ("app", "'pipeline.serve.app:build_ap': pipeline.serve.app defines no 'build_ap'")
    ]


# --- pieces --------------------------------------------------------------------------------------------------------


def test_strict_schema():
    schema = k8s.strict(
        {
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "string"}}},
                "free": {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True},
                "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            },
        }
    )
    import jsonschema

    ok = jsonschema.Draft7Validator(schema)
    assert ok.is_valid({"a": {"b": "x"}, "free": {"anything": 1}, "port": 80})
    assert ok.is_valid({"port": "http"})
    assert not ok.is_valid({"a": {"c": "x"}})
    assert not ok.is_valid({"port": 1.5})
    assert not ok.is_valid({"z": 1})


@pytest.mark.parametrize(
    ("text", "value"), [("500m", 0.5), ("4", 4), ("16Gi", 16 * 2**30), ("1e3", 1000), ("2k", 2000), (3, 3)]
)
def test_quantity(text, value):
    assert k8s.quantity(text) == value


@pytest.mark.parametrize(
    ("selector", "labels", "match"),
    [
        ({"p": "cpu"}, {"p": "cpu"}, True),
        ({"p": "cpu"}, {"p": "gpu"}, False),
        ({"p": "!gpu"}, {"p": "cpu"}, True),
        ({"p": "!gpu"}, {}, True),
        ({"p": "in(cpu, gpu)"}, {"p": "gpu"}, True),
        ({"p": "!in(cpu, gpu)"}, {"p": "gpu"}, False),
        ({}, {"p": "head"}, True),
    ],
)
def test_selects(selector, labels, match):
    assert k8s.selects(selector, labels) is match


@needs_kubectl
def test_cli_check_k8s(capsys):
    from pipeline.commands.cli import main

    assert main(["deploy", "check-k8s", "cpu-only", "--no-app-args"]) == 0
    assert capsys.readouterr().out.strip().endswith("cpu-only: ok")
