"""The feature store: Feast on Redis. Opening it, applying the definitions, materializing a bundle, and the
read path a request takes.

The read path goes under Feast's SDK: it computes Feast's own Redis keys and hash fields and reads a user's
batch and real-time rows in one pipelined round trip (Feast's `get_online_features` costs about 1 ms of Python
for the same). tests/pipeline/featurestore/test_store.py proves both return the same values.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from feast.infra.key_encoding_utils import deserialize_entity_key, serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.timestamp_pb2 import Timestamp

from chain.spans import span
from chain.types import UserRow, numeric_values
from feature_repo import definitions as defs
from models.bundle import Manifest
from models.errors import NotMaterializedError, StoreUnavailableError
from models.features import (
    BUNDLE_KEY,
    BY_NAME,
    EVENT_TIMESTAMP,
    ITEM_FEATURES,
    ITEM_KEY,
    REALTIME_FEATURES,
    USER_FEATURES,
    USER_KEY,
)
from models.realtime import Realtime
from models.snapshot import ITEM_FEATURES_FILE, USER_FEATURES_FILE

# Re-exported: they live in client.py, which imports no Feast.
from pipeline.featurestore.client import REDIS_ERRORS as REDIS_ERRORS
from pipeline.featurestore.client import fast_retry as fast_retry
from pipeline.featurestore.client import redis_client as redis_client
from settings import StoreSettings

if TYPE_CHECKING:
    from feast import FeatureStore

# The key format Feast writes with, read from the repo's own config so the two cannot drift.
ENTITY_KEY_VERSION = int(
    re.search(r"^entity_key_serialization_version:\s*(\d+)", (defs.REPO / "feature_store.yaml").read_text(), re.M)[1]
)


def unavailable(settings: StoreSettings, exc: Exception) -> StoreUnavailableError:
    host, port = settings.host_port
    return StoreUnavailableError(
        f"Redis at {host}:{port} does not answer ({exc}): start one with `deploy/ensure-redis.sh` "
        f"(it runs `redis-server --port {port} --appendonly yes --daemonize yes`, installing Debian's redis-server "
        "if needed), or point RECSERVE_REDIS at a running one; then retry"
    )


def require_redis(settings: StoreSettings) -> redis.Redis:
    client = redis_client(settings)
    try:
        client.ping()
    except REDIS_ERRORS as exc:
        raise unavailable(settings, exc) from None
    return client


def repo_config(settings: StoreSettings) -> Any:
    """feature_store.yaml with its ${VARS} filled from the settings (other ${VARS} from the environment)."""
    import yaml
    from feast.repo_config import RepoConfig

    values = {
        "RECSERVE_REDIS": settings.connection_string(),
        "RECSERVE_FEAST_PROJECT": settings.project,
        "RECSERVE_FEAST_REGISTRY": str(settings.registry),
    }
    text = (defs.REPO / "feature_store.yaml").read_text()
    text = re.sub(r"\$\{(\w+)\}", lambda m: values.get(m[1]) or os.environ.get(m[1], m[0]), text)
    raw = yaml.safe_load(text)
    raw["repo_path"] = defs.REPO
    return RepoConfig(**raw)


def open_store(settings: StoreSettings) -> FeatureStore:
    from feast import FeatureStore

    require_redis(settings)
    if isinstance(settings.registry, Path):
        settings.registry.parent.mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(defs.REPO), config=repo_config(settings))


# The event log's file columns beyond the push schema (pipeline/featurestore/eventlog.py writes them).
STREAM_ID = "stream_id"  # the row's Redis stream entry id, "<ms>-<seq>"
REPLACED_TS_NS = "replaced_ts_ns"  # Feast stamp (ns) of the stored row this one replaced; 0: the store had none
EVENT_LOG_SCHEMA_FILE = "user_events-schema.parquet"


def event_log_schema() -> pa.Schema:
    """One event log row: the push source's columns (user_id, event_timestamp, the rt_* features), then
    replaced_ts_ns and stream_id."""
    arrow = {"float32": pa.float32(), "int64": pa.int64(), "string": pa.string()}
    fields = [pa.field(USER_KEY, pa.string()), pa.field(EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC"))]
    for name in REALTIME_FEATURES:
        dtype = BY_NAME[name].dtype
        base = arrow[dtype.removesuffix("_list")]
        fields.append(pa.field(name, pa.list_(base) if dtype.endswith("_list") else base))
    fields += [pa.field(REPLACED_TS_NS, pa.int64()), pa.field(STREAM_ID, pa.string())]
    return pa.schema(fields)


def ensure_event_log(event_log_dir: Path) -> None:
    """An empty file of the log's schema in its directory: Feast's file store fails on a directory without one."""
    path = Path(event_log_dir) / EVENT_LOG_SCHEMA_FILE
    schema = event_log_schema()
    if path.is_file() and pq.read_schema(path).equals(schema):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # neither Feast's reader nor pyarrow's takes this name
    pq.write_table(schema.empty_table(), tmp)
    os.replace(tmp, path)


def apply(store: FeatureStore, bundle_dir: Path, event_log_dir: Path | None = None) -> list[str]:
    """Register (or update) every definition, with the batch sources over `bundle_dir` and the push source's
    offline twin over `event_log_dir` (default: the project's, StoreSettings.event_log_dir). Idempotent."""
    event_log_dir = Path(event_log_dir or StoreSettings(project=store.config.project).event_log_dir).resolve()
    ensure_event_log(event_log_dir)
    objs = defs.objects(Path(bundle_dir).resolve(), event_log_dir)
    store.apply(objs)
    return [f"{type(o).__name__} {o.name}" for o in objs]  # type: ignore[attr-defined]


def marker_key(project: str, version: str) -> str:
    return f"recserve:{project}:materialized:{version}"


def event_lock_key(project: str, user_id: str) -> str:
    """The writer's per-user lock; the event log's flusher reads it too."""
    return f"recserve:{project}:event-lock:{user_id}"


# Compare-and-delete: a lock or lease is released only by the holder whose token it still holds.
RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def persistence(client: redis.Redis) -> str:
    """How this Redis keeps its data across a restart: "aof(<appendfsync>)" (e.g. "aof(everysec)"), "rdb"
    (snapshots only), "none", or "unknown" where CONFIG GET is refused (managed Redis often disables it).

    Raises redis's ConnectionError or TimeoutError (REDIS_ERRORS) when Redis does not answer."""
    try:
        conf = client.config_get("appendonly", "appendfsync", "save")
    except redis.exceptions.ResponseError:
        return "unknown"
    conf = {_text(k): _text(v) for k, v in conf.items()}
    if "appendonly" not in conf:
        return "unknown"
    if conf["appendonly"] == "yes":
        return f"aof({conf.get('appendfsync', 'unknown')})"
    return "rdb" if conf.get("save", "").strip() else "none"


def materialize(store: FeatureStore, settings: StoreSettings, bundle_dir: Path, manifest: Manifest) -> dict:
    """Load one bundle's batch features into Redis under its version. Idempotent; other bundles' rows stay."""
    bundle_dir = Path(bundle_dir).resolve()
    apply(store, bundle_dir, settings.event_log_dir)
    cutoff = manifest.cutoff.tz_localize("UTC")
    # The rows are all stamped with the cutoff: a two-second window around it takes exactly them.
    try:
        store.materialize(
            start_date=(cutoff - pd.Timedelta(seconds=1)).to_pydatetime(),
            end_date=(cutoff + pd.Timedelta(seconds=1)).to_pydatetime(),
            feature_views=[defs.USER_BATCH, defs.ITEM_BATCH],
        )
    except REDIS_ERRORS as exc:
        raise unavailable(settings, exc) from None
    version = manifest.version
    items = pd.read_parquet(bundle_dir / ITEM_FEATURES_FILE, columns=[ITEM_KEY])[ITEM_KEY]
    users = pd.read_parquet(bundle_dir / USER_FEATURES_FILE, columns=[USER_KEY])[USER_KEY]
    client = require_redis(settings)
    # Check what landed before marking the bundle servable: every item row and every user row.
    present_items = _count_present(client, [batch_key(settings.project, version, ITEM_KEY, i) for i in items])
    present_users = _count_present(client, [batch_key(settings.project, version, USER_KEY, u) for u in users])
    if present_items != len(items) or present_users != len(users):
        raise NotMaterializedError(
            f"after materializing {version}, Redis holds {present_items}/{len(items)} item rows and "
            f"{present_users}/{len(users)} user rows: check Redis's memory limit and rerun"
        )
    record = {"items": len(items), "users": len(users), "cutoff": str(cutoff), "bundle": str(bundle_dir)}
    client.set(marker_key(settings.project, version), json.dumps(record))
    return record


def require_materialized(settings: StoreSettings, version: str, bundle: Path | str = "<its directory>") -> redis.Redis:
    """A client of the store, once the bundle's marker shows its rows are all there (materialize writes it last).
    Raises NotMaterializedError naming the command, or StoreUnavailableError."""
    client = require_redis(settings)
    try:
        marked = client.exists(marker_key(settings.project, version))
    except REDIS_ERRORS as exc:
        raise unavailable(settings, exc) from None
    if not marked:
        raise NotMaterializedError(
            f"bundle {version} is not in the feature store (project {settings.project}): run "
            f"`recserve features materialize --bundle {bundle}` first"
        )
    return client


def _count_present(client: redis.Redis, keys: list[bytes]) -> int:
    with client.pipeline(transaction=False) as pipe:
        for k in keys:
            pipe.exists(k)
        return int(sum(pipe.execute()))


def entity_key(project: str, **join_keys: str) -> bytes:
    """The Redis key of one entity row, by the function Feast's Redis online store writes with (`_redis_key`), so
    reads here and Feast's writes (materialize, push) share one codec."""
    proto = EntityKeyProto(
        join_keys=list(join_keys), entity_values=[ValueProto(string_val=v) for v in join_keys.values()]
    )
    return _redis_key(project, proto, entity_key_serialization_version=ENTITY_KEY_VERSION)


def batch_key(project: str, version: str, key_name: str, value: str) -> bytes:
    return entity_key(project, **{BUNDLE_KEY: version, key_name: value})


def _fields(view: str, names: Sequence[str]) -> list[bytes | str]:
    return [*(_mmh3(f"{view}:{n}") for n in names), f"_ts:{view}"]


USER_BATCH_FIELDS = _fields(defs.USER_BATCH, USER_FEATURES)
REALTIME_FIELDS = _fields(defs.USER_REALTIME, REALTIME_FEATURES)
ITEM_FIELDS = _fields(defs.ITEM_BATCH, ITEM_FEATURES)


def decode(raw: bytes | None) -> Any:
    """One stored ValueProto as a Python value (lists for list types); None where nothing or null is stored."""
    if raw is None:
        return None
    value = ValueProto.FromString(raw)
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    out = getattr(value, kind)
    return list(out.val) if kind.endswith("_list_val") else out


def decode_ts_ns(raw: bytes | None) -> int:
    if raw is None:
        return 0
    ts = Timestamp.FromString(raw)
    return ts.seconds * 1_000_000_000 + ts.nanos


def _row(names: Sequence[str], raw: list[bytes | None]) -> dict[str, Any]:
    """One HMGET reply (features, then the _ts field) as feature name → value."""
    return dict(zip(names, map(decode, raw[:-1]), strict=True))


@dataclass(frozen=True)
class Hydrated:
    user: UserRow
    items: np.ndarray  # int64 catalog indices, as asked
    item_features: np.ndarray  # float32 (len(items), len(ITEM_FEATURES)), ITEM_FEATURES order


class OnlineFeatures:
    """The request-time read path for one bundle: the user's rows from Redis on every call, item features
    from memory (they are static for a bundle)."""

    MAX_ITEMS = 500

    def __init__(
        self,
        settings: StoreSettings,
        version: str,
        item_ids: np.ndarray,
        item_matrix: np.ndarray,
        client: redis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.client = client or redis_client(settings)  # connects lazily
        self.version = version
        self.item_ids = item_ids
        self.item_index = {item: i for i, item in enumerate(item_ids.tolist())}
        self.item_matrix = item_matrix

    @classmethod
    def for_bundle(
        cls, settings: StoreSettings, version: str, item_ids: np.ndarray, item_matrix: np.ndarray
    ) -> OnlineFeatures:
        """The store's reader for a bundle that is materialized (its marker is written only once every row is
        there), with the bundle's own item features: the values `load` reads back (tests/pipeline/featurestore/
        test_store.py checks they are equal), without 3,751 reads held under the GIL beside a serving loop.
        Raises NotMaterializedError naming the command."""
        return cls(settings, version, item_ids, item_matrix, require_materialized(settings, version))

    @classmethod
    def load(cls, settings: StoreSettings, version: str, item_ids: Sequence[str]) -> OnlineFeatures:
        """Read the bundle's item features from the store once; refuse a bundle that is not materialized."""
        client = require_redis(settings)
        try:
            marked = client.exists(marker_key(settings.project, version))
            with client.pipeline(transaction=False) as pipe:
                for item in item_ids:
                    pipe.hmget(batch_key(settings.project, version, ITEM_KEY, item), ITEM_FIELDS)
                rows = pipe.execute()
        except REDIS_ERRORS as exc:
            raise unavailable(settings, exc) from None
        missing = [item for item, row in zip(item_ids, rows, strict=True) if row[-1] is None]
        if not marked or missing:
            raise NotMaterializedError(
                f"bundle {version} is not in the feature store (project {settings.project}; "
                f"{len(missing)} of {len(item_ids)} items missing): run "
                f"`recserve features materialize --bundle <its directory>`"
            )
        matrix = np.stack([numeric_values(_row(ITEM_FEATURES, row), ITEM_FEATURES) for row in rows])
        return cls(settings, version, np.asarray(item_ids, dtype=str), matrix, client)

    def user(self, user_id: str) -> UserRow:
        project = self.settings.project
        try:
            # One round trip, two HMGETs; the span (a child of the chain's `features`, in a sampled request) is
            # the read as the request saw it: connection checkout, the round trip and the reply's parsing.
            with (
                span("redis.user", **{"db.system": "redis", "db.operation": "HMGET"}),
                self.client.pipeline(transaction=False) as pipe,
            ):
                pipe.hmget(batch_key(project, self.version, USER_KEY, user_id), USER_BATCH_FIELDS)
                pipe.hmget(entity_key(project, **{USER_KEY: user_id}), REALTIME_FIELDS)
                batch, realtime = pipe.execute()
        except REDIS_ERRORS as exc:
            raise unavailable(self.settings, exc) from None
        return UserRow.from_values(user_id, {**_row(USER_FEATURES, batch), **_row(REALTIME_FEATURES, realtime)})

    def read(self, user_id: str, items: np.ndarray) -> Hydrated:
        """The user's batch and real-time features and, for up to MAX_ITEMS catalog indices, the item features."""
        if items.shape[0] > self.MAX_ITEMS:
            raise ValueError(f"{items.shape[0]} candidate items asked; the read path takes at most {self.MAX_ITEMS}")
        return Hydrated(self.user(user_id), items, self.item_matrix[items])


def read_realtime(client: redis.Redis, project: str, user_ids: Sequence[str]) -> dict[str, tuple[Realtime, int]]:
    """Each user's event window and the Feast timestamp (ns) of its row, 0 when none: the writer's read."""
    with client.pipeline(transaction=False) as pipe:
        for u in user_ids:
            pipe.hmget(entity_key(project, **{USER_KEY: u}), REALTIME_FIELDS)
        rows = pipe.execute()
    return {
        u: (Realtime.from_columns(_row(REALTIME_FEATURES, row)), decode_ts_ns(row[-1]))
        for u, row in zip(user_ids, rows, strict=True)
    }


def read_user_via_feast(store: FeatureStore, version: str, user_id: str) -> UserRow:
    """The same read through Feast's SDK and the ingress feature service: the reference for the fast path."""
    response = store.get_online_features(
        features=store.get_feature_service(defs.INGRESS_SERVICE),
        entity_rows=[{USER_KEY: user_id, BUNDLE_KEY: version}],
    ).to_dict()
    return UserRow.from_values(user_id, {name: response[name][0] for name in (*USER_FEATURES, *REALTIME_FEATURES)})


def _is_entity_key(raw: bytes) -> bool:
    # Exactly a serialized entity key, so project "x_recserve"'s keys never pass for project "recserve"'s.
    try:
        proto = deserialize_entity_key(raw, entity_key_serialization_version=ENTITY_KEY_VERSION)
        return serialize_entity_key(proto, entity_key_serialization_version=ENTITY_KEY_VERSION) == raw
    except Exception:
        return False


def drop_project(store: FeatureStore, settings: StoreSettings) -> int:
    """Delete every online row and recserve key of one project (tests and benches use scratch projects)."""
    client = require_redis(settings)
    suffix = settings.project.encode()
    keys = [k for k in client.scan_iter(match=b"*" + suffix, count=1000) if _is_entity_key(k[: -len(suffix)])]
    keys += list(client.scan_iter(match=f"recserve:{settings.project}:*", count=1000))
    for lo in range(0, len(keys), 1000):
        client.delete(*keys[lo : lo + 1000])
    return len(keys)
