"""The `recserve` console script, run as a user runs it: in a subprocess, checking output and exit codes."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DATA, recserve


def test_help_lists_the_subcommands():
    out = recserve("--help")
    assert out.returncode == 0
    assert "train" in out.stdout and "evaluate" in out.stdout
    assert "--cutoff" in recserve("train", "--help").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--cutoff", "2012-01-01"], "outside the data: it needs"),
        (["train", "--cutoff", "09/11/2011"], "is not a date: write it as YYYY-MM-DD"),
        (["train", "--version", "a/b"], "not a usable name"),
        (["train", "--data", "/nonexistent.parquet"], "does not exist"),
        (["evaluate", "--bundle", "/nonexistent-bundle"], "no bundle at /nonexistent-bundle"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_non_zero_with_a_message(args, message, tmp_path):
    out = recserve(*args, "--out", str(tmp_path)) if args[0] == "train" else recserve(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_evaluate_writes_table_json_and_plot(small_bundle, tmp_path):
    out = recserve(
        "evaluate", "--bundle", str(small_bundle), "--json", str(tmp_path / "m.json"), "--plot", str(tmp_path / "m.png")
    )
    assert out.returncode == 0, out.stderr
    assert "| blend (LambdaRank) |" in out.stdout and "| repeat-history |" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("evaluated bundle slice-v1")
    report = json.loads((tmp_path / "m.json").read_text())
    assert set(report["systems"]) == {"popularity", "history", "cf", "content", "blend"}
    assert 0 < report["candidate_recall"] <= 1
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_other_data(small_bundle, tmp_path):
    other = tmp_path / "other.parquet"
    other.write_bytes(DATA.read_bytes() + b"\0")
    out = recserve("evaluate", "--bundle", str(small_bundle), "--data", str(other))
    assert out.returncode == 2 and "is not the data bundle slice-v1 was trained on" in out.stderr


@pytest.mark.integration
def test_default_training_meets_the_blend_bar(full_bundle):
    """The product's offline bar on the default split: blend NDCG@10 >= 1.10x the best single source."""
    assert full_bundle.stdout.strip().splitlines()[-1].startswith("trained bundle full")
    manifest = json.loads((full_bundle.path / "manifest.json").read_text())
    metrics = manifest["metrics"]
    best_single = max(metrics["systems"][s]["ndcg@10"] for s in ("popularity", "history", "cf", "content"))
    assert metrics["systems"]["blend"]["ndcg@10"] >= 1.10 * best_single
    assert metrics["candidate_recall"] > metrics["systems"]["blend"]["recall@50"]
    assert (full_bundle.path.parent / "LATEST").read_text().strip() == "full"


def test_bad_settings_file_names_the_field(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text('{"cf": {"factors": 0}}')
    out = recserve("train", "--settings", str(bad), "--out", str(tmp_path))
    assert out.returncode == 2
    assert "field 'cf.factors'" in out.stderr and "greater than or equal to 2" in out.stderr
    unknown = tmp_path / "u.json"
    unknown.write_text('{"cf": {"fators": 8}}')
    out = recserve("train", "--settings", str(unknown), "--out", str(tmp_path))
    assert out.returncode == 2 and "cf.fators" in out.stderr


def test_keys_create_prints_the_key_once_and_appends_its_digest(tmp_path):
    from pipeline.edge.auth import KeyRing
    from settings import AuthSettings

    path = tmp_path / "secrets" / "api-keys"
    out = recserve(
        "keys", "create", "--name", "ci", "--scope", "events:write", env={"RECSERVE_API_KEYS_FILE": str(path)}
    )
    assert out.returncode == 0, out.stderr
    key = out.stdout.split("\n\n")[1].strip()
    assert len(key) == 43 and out.stdout.count(key) == 1
    assert key not in path.read_text()  # only its digest is stored
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    second = recserve("keys", "create", "--name", "ops", "--scope", "admin", "--file", str(path))
    assert second.returncode == 0, second.stderr
    ops = second.stdout.split("\n\n")[1].strip()
    keyring = KeyRing(AuthSettings(api_keys_file=path))
    assert keyring.authorize(f"Bearer {key}", "events:write", "test").name == "ci"
    assert keyring.authorize(f"Bearer {ops}", "admin", "test").name == "ops"
    again = recserve("keys", "create", "--name", "ci", "--scope", "admin", "--file", str(path))
    assert again.returncode == 2 and "already has a key named 'ci': pick another name" in again.stderr
    bad = recserve("keys", "create", "--name", "x", "--scope", "events:read", "--file", str(path))
    assert bad.returncode == 2 and "--scope 'events:read': give one or more of events:write, admin" in bad.stderr
    assert len(path.read_text().splitlines()) == 2


def test_rollout_commands_need_an_admin_key_before_anything_else(tmp_path):
    out = recserve("rollout", "status", "--url", "http://127.0.0.1:9", env={"RECSERVE_API_KEY": ""})
    assert out.returncode == 2
    assert "needs an API key with scope admin: pass --key KEY or set RECSERVE_API_KEY" in out.stderr
    down = recserve("rollout", "rollback", "--url", "http://127.0.0.1:9", "--key", "k")
    assert down.returncode == 2 and "/admin/rollout answered nothing" in down.stderr
