"""The process settings (settings.py): the environment variables they read, the errors a bad value raises, and the
artifacts root, which never depends on the current directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from models.errors import ConfigError
from settings import (
    KEYS_FILE,
    PROJECT_ROOT,
    AuthSettings,
    ServeSettings,
    Settings,
    StoreSettings,
    ThreadSettings,
    env_names,
    process_env,
)
from tests.conftest import recserve


@pytest.fixture
def clean_env(monkeypatch):
    """No setting from this machine's environment leaks into a test."""
    for name in env_names():
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults(clean_env):
    s = Settings()
    assert s.project_root == PROJECT_ROOT
    assert s.artifacts == PROJECT_ROOT / "artifacts"
    assert (s.store.redis, s.store.project) == ("localhost:6379", "recserve")
    assert s.store.registry == PROJECT_ROOT / "feature_repo" / "data" / "registry.db"
    assert s.store.event_log_dir == PROJECT_ROOT / "feature_repo" / "data" / "event_log" / "recserve"
    assert (s.serve.ray_port, s.serve.metrics_port) == (6380, 8080)
    assert (s.threads.torch, s.threads.blas) == (1, 1)
    assert (s.auth.api_keys, s.auth.api_keys_file, s.auth.api_key) == (None, KEYS_FILE, None)
    assert KEYS_FILE == PROJECT_ROOT / ".recserve" / "api-keys"


@pytest.mark.parametrize(
    ("variable", "value", "read"),
    [
        ("RECSERVE_REDIS", "127.0.0.1:6390", lambda s: s.store.redis),
        ("RECSERVE_FEAST_PROJECT", "other", lambda s: s.store.project),
        ("RECSERVE_FEAST_REGISTRY", "/tmp/r.db", lambda s: str(s.store.registry)),
        ("RECSERVE_EVENT_LOG_DIR", "/tmp/events", lambda s: str(s.store.event_log_dir)),
        ("RECSERVE_EVENT_LOG_FLUSH_S", "0.5", lambda s: str(s.store.event_log_flush_s)),
        ("RECSERVE_RAY_PORT", "6391", lambda s: str(s.serve.ray_port)),
        ("RECSERVE_RAY_TMP", "/tmp/ray-x", lambda s: str(s.serve.ray_tmp)),
        ("RECSERVE_HAPROXY_DIR", "/tmp/hap-x", lambda s: str(s.serve.haproxy_dir)),
        ("RECSERVE_METRICS_PORT", "8091", lambda s: str(s.serve.metrics_port)),
        ("RECSERVE_TORCH_THREADS", "2", lambda s: str(s.threads.torch)),
        ("OPENBLAS_NUM_THREADS", "2", lambda s: str(s.threads.blas)),
        ("RECSERVE_COMPILE_CACHE", "/tmp/cc", lambda s: str(s.compile_cache)),
        ("RECSERVE_ARTIFACTS", "/tmp/arts", lambda s: str(s.artifacts)),
        ("RECSERVE_BUNDLE", "/tmp/arts/v1", lambda s: str(s.feast_bundle)),
        ("RECSERVE_API_KEYS", "ci " + "ab" * 32 + " events:write", lambda s: s.auth.api_keys),
        ("RECSERVE_API_KEYS_FILE", "/run/secrets/recserve-keys", lambda s: str(s.auth.api_keys_file)),
    ],
)
def test_each_variable_sets_its_setting(clean_env, variable, value, read):
    clean_env.setenv(variable, value)
    assert read(Settings()) == value
    assert variable in env_names()


def test_the_event_log_follows_the_project(clean_env):
    clean_env.setenv("RECSERVE_FEAST_PROJECT", "scratch")
    assert StoreSettings().event_log_dir.name == "scratch"
    assert StoreSettings(project="mine").event_log_dir.name == "mine"


def test_arguments_win_over_the_environment_and_no_second_name_is_read(clean_env):
    clean_env.setenv("RECSERVE_FEAST_PROJECT", "from_env")
    assert StoreSettings(project="given").project == "given"
    assert StoreSettings.model_validate({"project": "in_config"}).project == "in_config"
    clean_env.delenv("RECSERVE_FEAST_PROJECT")
    clean_env.setenv("RECSERVE_PROJECT", "not_a_name_of_it")  # only RECSERVE_FEAST_PROJECT sets the project
    assert StoreSettings().project == "recserve"


def test_an_empty_variable_counts_as_unset(clean_env):
    clean_env.setenv("RECSERVE_REDIS", "")
    assert Settings().store.redis == "localhost:6379"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("RECSERVE_RAY_PORT", "abc", "RECSERVE_RAY_PORT='abc': Input should be a valid integer"),
        ("RECSERVE_RAY_PORT", "70000", "RECSERVE_RAY_PORT='70000': Input should be less than or equal to 65535"),
        ("RECSERVE_HAPROXY_DIR", "/tmp/" + "x" * 40, "at most 29 characters"),
        ("RECSERVE_FEAST_PROJECT", "a-b", "RECSERVE_FEAST_PROJECT='a-b': String should match pattern"),
        ("RECSERVE_EVENT_LOG_FLUSH_S", "0", "RECSERVE_EVENT_LOG_FLUSH_S='0': Input should be greater than 0"),
        ("RECSERVE_TORCH_THREADS", "0", "RECSERVE_TORCH_THREADS='0': Input should be greater than or equal to 1"),
        ("OPENBLAS_NUM_THREADS", "many", "OPENBLAS_NUM_THREADS='many': Input should be a valid integer"),
    ],
)
def test_a_bad_variable_names_itself_and_the_fix(clean_env, variable, value, message):
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        Settings()
    assert message in str(caught.value)
    assert str(caught.value).endswith("; unset it or fix it")


def test_a_bad_argument_names_the_setting():
    with pytest.raises(ConfigError, match=r"^feature store setting 'project': String should match pattern .*'a-b'"):
        StoreSettings(project="a-b")
    with pytest.raises(ConfigError, match=r"^serve setting 'typo_port': Extra inputs are not permitted \(given 1\)"):
        ServeSettings(typo_port=1)


def test_the_artifacts_root_does_not_depend_on_the_current_directory(clean_env, tmp_path):
    clean_env.chdir(tmp_path)
    assert Settings().artifacts == PROJECT_ROOT / "artifacts"
    clean_env.setenv("RECSERVE_ARTIFACTS", "elsewhere")  # relative: from the project root
    assert Settings().artifacts == PROJECT_ROOT / "elsewhere"


def test_the_cli_finds_artifacts_from_any_directory(tmp_path):
    # No bundle under this root: the message names the project's folder, not one under the current directory.
    out = recserve("evaluate", cwd=tmp_path, env={"RECSERVE_ARTIFACTS": "no-such-artifacts"})
    assert out.returncode == 2
    assert f"no bundle in {PROJECT_ROOT / 'no-such-artifacts'}" in out.stderr


def test_the_cli_reports_a_bad_variable(tmp_path):
    out = recserve("evaluate", cwd=tmp_path, env={"RECSERVE_TORCH_THREADS": "lots"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "RECSERVE_TORCH_THREADS='lots': Input should be a valid integer" in out.stderr


def test_latest_bundle(tmp_path):
    (tmp_path / "v2").mkdir()
    (tmp_path / "LATEST").write_text("v2\n")
    assert Settings(artifacts=tmp_path).latest_bundle() == tmp_path / "v2"


def test_process_env():
    env = process_env(ThreadSettings(blas=2))
    assert env["OPENBLAS_NUM_THREADS"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["FEAST_USAGE"] == "False"


def test_configure_process_sets_the_environment_before_numpy_loads(tmp_path):
    # A fresh interpreter, as an entry point starts: after configure_process, numpy's OpenBLAS runs one thread.
    code = (
        "import os, sys\n"
        "from settings import configure_process\n"
        "assert 'numpy' not in sys.modules\n"
        "configure_process()\n"
        "import numpy\n"
        "from threadpoolctl import threadpool_info\n"
        "blas = [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'], os.environ['HF_HUB_OFFLINE'], blas)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in {"OPENBLAS_NUM_THREADS", "HF_HUB_OFFLINE"}}
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["1", "1"]
    assert "[1]" in out.stdout or "[]" in out.stdout  # [] where numpy links no OpenBLAS


DIGEST = "0123456789abcdef" * 4


def test_api_keys_come_from_the_environment_and_a_file(clean_env, tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-11\n\nci-old {DIGEST} events:write\nops {DIGEST.upper()} admin,events:write\n")
    clean_env.setenv("RECSERVE_API_KEYS", f"bench {'f' * 64} events:write; ;drill {'e' * 64} admin")
    clean_env.setenv("RECSERVE_API_KEYS_FILE", str(path))
    clean_env.setenv("RECSERVE_API_KEY", "the-client-key")
    auth = Settings().auth
    keys = auth.keys()
    assert [(k.name, k.source) for k in keys] == [
        ("bench", "RECSERVE_API_KEYS entry 1"),
        ("drill", "RECSERVE_API_KEYS entry 3"),
        ("ci-old", f"{path} line 3"),
        ("ops", f"{path} line 4"),
    ]
    assert keys[2].digest == bytes.fromhex(DIGEST) and keys[3].scopes == {"admin", "events:write"}
    assert keys[3].allows("events:write") and keys[1].allows("events:write") and not keys[0].allows("admin")
    assert auth.api_key.get_secret_value() == "the-client-key" and "the-client-key" not in repr(auth)
    assert AuthSettings(api_keys_file=tmp_path / "missing").file_keys() == ()  # no file: no keys from it


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f"ci {DIGEST}", "line 2: 2 words, not 3: write `<name> <sha256 hex of the key> <scope>"),
        (f"ci {DIGEST} events:read", "line 2: key 'ci' has unknown scope(s) ['events:read']"),
        ("ci my-secret-key events:write", "line 2: key 'ci' has no sha256 digest (64 hex digits) but 13 characters"),
        (f"c/i {DIGEST} admin", "line 2: name 'c/i' must match"),
        (f"ok {DIGEST} admin", "line 2: key name 'ok' is given twice: give each key a name of its own"),
    ],
)
def test_a_bad_key_line_names_the_file_line_and_the_fix(clean_env, tmp_path, line, message):
    path = tmp_path / "keys"
    path.write_text(f"ok {DIGEST} admin\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        AuthSettings(api_keys_file=path).keys()
    assert str(caught.value).startswith(f"{path} {message}")


def test_a_bad_inline_key_entry_names_the_variable(clean_env):
    clean_env.setenv("RECSERVE_API_KEYS", f"ci {DIGEST} events:write;ops {DIGEST}")
    with pytest.raises(ConfigError, match=r"RECSERVE_API_KEYS entry 2: 2 words, not 3"):
        Settings()
