"""The Dockerfile, compose.yaml and the files they mount agree with each other and with the code: pins, variable
names, ports and paths. (hadolint and the Compose schema check run in `make lint`; the processes themselves start in
test_image_smoke.py.)"""

from __future__ import annotations

import re

import yaml

from settings import ServeSettings, env_names
from tests.conftest import ROOT
from tests.support.image import compose, dockerfile_stages, image, mounts


def test_torch_in_the_image_is_the_locked_version_as_the_cpu_build():
    locked = re.search(r"^torch==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)[1]
    build, _ = dockerfile_stages(ROOT / "Dockerfile")
    runs = " ".join(build.runs)
    assert re.findall(r"torch==(\S+)", runs) == [f"{locked}+cpu"]
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs


def test_every_recserve_variable_is_one_the_settings_read():
    known = set(env_names())
    given = set(image(ROOT).env) | set(compose(ROOT)["services"]["recserve"]["environment"])
    ours = {name for name in given if name.startswith("RECSERVE_")}
    assert ours and ours <= known, ours - known


def test_the_image_runs_as_a_user_offline():
    final = image(ROOT)
    assert final.user and final.user.split(":")[0] not in ("root", "0")
    assert final.env["HF_HUB_OFFLINE"] == "1"
    assert "/readyz" in " ".join(final.healthcheck)


def test_compose_mounts_files_the_repo_has():
    services = compose(ROOT)["services"]
    for name, service in services.items():
        for m in mounts(service):
            if m.bind and m.source != "./artifacts":  # the bundles are the operator's
                assert (ROOT / m.source).exists(), (name, m.source)
    assert all(m.read_only for m in mounts(services["recserve"]) if m.bind)


def test_prometheus_scrapes_the_recserve_metrics_port():
    services = compose(ROOT)["services"]
    config = next(m for m in mounts(services["prometheus"]) if m.target == "/etc/prometheus/prometheus.yml")
    scrape = yaml.safe_load((ROOT / config.source).read_text())["scrape_configs"]
    targets = [t for job in scrape for group in job["static_configs"] for t in group["targets"]]
    metrics_port = ServeSettings().metrics_port  # the image sets no RECSERVE_METRICS_PORT
    assert "RECSERVE_METRICS_PORT" not in image(ROOT).env
    assert targets == [f"recserve:{metrics_port}"]
    assert str(metrics_port) in services["recserve"]["expose"]


def test_grafana_is_provisioned_from_the_mounted_folders():
    grafana = {m.target: m.source for m in mounts(compose(ROOT)["services"]["grafana"])}
    provisioning = ROOT / grafana["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"]
    providers = yaml.safe_load((provisioning / "dashboards" / "recserve.yml").read_text())["providers"]
    (path,) = [p["options"]["path"] for p in providers]
    assert grafana[path] == "./deploy/grafana/dashboards"
