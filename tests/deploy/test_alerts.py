"""The alert rules in deploy/alerts.yml: promtool's unit tests (deploy/alerts.test.yml) pass, every rule has a case
that fires and one that stays quiet, the latency thresholds sit on histogram bucket bounds below the last one, and
deploy/prometheus.yml loads the rules."""

from __future__ import annotations

import re
import subprocess

import yaml

from pipeline.serve.metrics import LATENCY_MS, REQUEST_LATENCY_MS
from tests.conftest import ROOT
from tests.support.prometheus import binary

DEPLOY = ROOT / "deploy"


def rules() -> list[dict]:
    return [r for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def test_promtool_unit_tests_pass():
    out = subprocess.run(
        [binary("promtool"), "test", "rules", "alerts.test.yml"], cwd=DEPLOY, capture_output=True, text=True
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]


def test_the_config_and_its_rules_are_valid():
    out = subprocess.run(
        [binary("promtool"), "check", "config", "prometheus.yml"], cwd=DEPLOY, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules())} rules found" in out.stdout


def test_every_rule_has_a_case_that_fires_and_one_that_stays_quiet():
    cases = [
        case
        for test in yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for rule in rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no case that fires"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no case that stays quiet"


def test_latency_thresholds_are_bucket_bounds_below_the_last():
    """histogram_quantile can only say "above the last finite bound" past it; at a bound the comparison is exact."""
    latency = [r for r in rules() if "latency_ms_bucket" in r["expr"]]
    assert latency
    for rule in latency:
        thresholds = [float(t) for t in re.findall(r"\)\s*>\s*([0-9.]+)\s*$", rule["expr"])]
        assert thresholds, rule["expr"]
        for t in thresholds:
            bounds = REQUEST_LATENCY_MS if "request_latency" in rule["expr"] else LATENCY_MS
            assert t in bounds and t < bounds[-1], (rule["alert"], t)


def test_drift_thresholds_are_the_monitors():
    """The drift rules' two tiers: the calendar features and each tier's threshold are chain/drift.py's."""
    from chain.drift import CALENDAR_FEATURES, THRESHOLDS

    for rule, k in (("RecserveDriftPSI", 0), ("RecserveDriftJS", 1)):
        expr = next(r["expr"] for r in rules() if r["alert"] == rule)
        steady, calendar = re.findall(r'feature(!~|=~)"([^"]+)"\}\)\s*>\s*([0-9.]+)', expr)
        assert steady[0] == "!~" and calendar[0] == "=~" and steady[1] == calendar[1]
        assert set(steady[1].split("|")) == CALENDAR_FEATURES
        assert float(steady[2]) == THRESHOLDS["steady"][k] and float(calendar[2]) == THRESHOLDS["calendar"][k]
