"""recserve's Feast objects, in one flat module: entities, sources, feature views and feature services.

Feature names and dtypes come from models.features.FEATURES, the list the blender is trained on, so the store
and the models cannot drift apart. Batch rows are keyed by (bundle_version, id): materializing a new bundle
writes new keys and leaves the live bundle's rows alone. Real-time rows are keyed by user only, because events
belong to the user, whatever bundle serves them.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, FeastType, Float32, Int64, String

from models.errors import BundleNotFoundError
from models.features import BUNDLE_KEY, EVENT_TIMESTAMP, FEATURES, ITEM_KEY, USER_KEY, USER_NUMERIC_FEATURES
from models.snapshot import ITEM_FEATURES_FILE, USER_FEATURES_FILE
from settings import Settings, StoreSettings

REPO = Path(__file__).resolve().parent

USER_BATCH = "user_batch"
ITEM_BATCH = "item_batch"
USER_REALTIME = "user_realtime"
PUSH_SOURCE = "user_events"
# The ingress reads this per request; the blender's store-side inputs are the other. Bump the suffix when a
# service's features change, and keep the old one until no deployed bundle asks for it.
INGRESS_SERVICE = "ingress_v1"
BLENDER_SERVICE = "blender_v1"

_FEAST_TYPES: dict[str, FeastType] = {
    "float32": Float32,
    "int64": Int64,
    "string": String,
    "int64_list": Array(Int64),
    "string_list": Array(String),
}


def fields(group: str) -> list[Field]:
    return [
        Field(name=f.name, dtype=_FEAST_TYPES[f.dtype], description=f.description) for f in FEATURES if f.group == group
    ]


customer = Entity(
    name="customer",
    join_keys=[USER_KEY],
    value_type=ValueType.STRING,
    description="a shop customer: the dataset's CustomerID as text; any other id is a new user",
)
product = Entity(
    name="product", join_keys=[ITEM_KEY], value_type=ValueType.STRING, description="a product: its StockCode"
)
bundle = Entity(
    name="bundle",
    join_keys=[BUNDLE_KEY],
    value_type=ValueType.STRING,
    description="the model bundle whose training snapshot the batch rows come from",
)


def realtime_view(event_log_dir: Path) -> tuple[PushSource, FeatureView]:
    """The push source, whose offline twin is the event log's directory of hourly files, and its view."""
    source = PushSource(
        name=PUSH_SOURCE,
        # Every pushed row, as pipeline/featurestore/eventlog.py flushes it (the push schema plus stream_id,
        # replaced_ts_ns).
        # Feast's file offline store reads a directory as one table, taking every *.parquet file in it.
        batch_source=FileSource(name="user_events_log", path=str(event_log_dir), timestamp_field=EVENT_TIMESTAMP),
    )
    view = FeatureView(
        name=USER_REALTIME,
        entities=[customer],
        ttl=timedelta(0),
        schema=fields("realtime"),
        source=source,
        online=True,
        description="the user's recent events, written by POST /events through the push source",
    )
    return source, view


user_events, user_realtime = realtime_view(StoreSettings().event_log_dir)


def _batch_view(name: str, key_entity: Entity, group: str, file: Path) -> FeatureView:
    source = FileSource(name=f"{group}_features_file", path=str(file), timestamp_field=EVENT_TIMESTAMP)
    return FeatureView(
        name=name,
        entities=[bundle, key_entity],
        ttl=timedelta(0),
        schema=fields(group),
        source=source,
        online=True,
        description=f"{group} features as of the bundle's cutoff",
    )


def batch_views(bundle_dir: Path) -> tuple[FeatureView, FeatureView]:
    """The batch views over one bundle's feature files (`recserve train` writes them for its cutoff)."""
    return (
        _batch_view(USER_BATCH, customer, "user", bundle_dir / USER_FEATURES_FILE),
        _batch_view(ITEM_BATCH, product, "item", bundle_dir / ITEM_FEATURES_FILE),
    )


def services(
    user_view: FeatureView, item_view: FeatureView, realtime: FeatureView = user_realtime
) -> tuple[FeatureService, FeatureService]:
    ingress = FeatureService(
        name=INGRESS_SERVICE,
        features=[user_view, realtime],
        description="per request: the user's batch and real-time features",
    )
    blender = FeatureService(
        name=BLENDER_SERVICE,
        features=[user_view[list(USER_NUMERIC_FEATURES)], item_view],
        description="the blender's user and item inputs (source scores and user-item features come from the models)",
    )
    return ingress, blender


def objects(bundle_dir: Path, event_log_dir: Path | None = None) -> list[object]:
    """Everything to apply, with the batch sources over `bundle_dir` and the event log's files in
    `event_log_dir` (default: the store settings' event_log_dir)."""
    user_view, item_view = batch_views(bundle_dir)
    source, realtime = realtime_view(event_log_dir or StoreSettings().event_log_dir)
    return [
        customer,
        product,
        bundle,
        source,
        realtime,
        user_view,
        item_view,
        *services(user_view, item_view, realtime),
    ]


def _default_bundle() -> Path:
    # For the plain `feast` CLI: RECSERVE_BUNDLE, else the bundle artifacts/LATEST names.
    settings = Settings()
    if settings.feast_bundle is not None:
        return settings.feast_bundle.resolve()
    try:
        return settings.latest_bundle()
    except BundleNotFoundError:
        return settings.artifacts / "no-bundle-yet"


user_batch, item_batch = batch_views(_default_bundle())
ingress_v1, blender_v1 = services(user_batch, item_batch)
