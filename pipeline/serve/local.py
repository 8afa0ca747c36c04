"""The ingress's Api built in one process, as each Ingress replica builds it; and, run as a module, the same Api
under plain uvicorn without Ray: the in-process floor that loadtests/bench.py measures Ray Serve against.

    python -m pipeline.serve.local [--config deploy/serve_config.yaml] [--port 8001]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI

from chain.knobs import Knobs
from chain.ports import BundleStages, Stages
from chain.recommend import Chain
from chain.retrieve import CFStage, ContentStage
from chain.runtimes import LocalStages
from chain.score import BlendStage
from models.blender import Blender as BlenderModel
from models.bundle import ServingCore, load_core
from models.cf import ALSModel
from models.content import ContentModel, pick_device
from models.errors import ConfigError, RecserveError
from pipeline.edge.api import Api, build_api
from pipeline.edge.auth import KeyRing
from pipeline.featurestore.eventlog import EventLog, rebuild_realtime
from pipeline.featurestore.events import EventWriter
from pipeline.featurestore.outcomes import Outcomes
from pipeline.featurestore.recovery import StoreWatch, bundle_materializer
from pipeline.featurestore.store import OnlineFeatures, open_store, redis_client
from pipeline.serve.args import AppArgs, local_bundle
from pipeline.serve.driftlog import DriftLog
from pipeline.serve.guard import LoadTurns, RollbackLedger
from pipeline.serve.metrics import NullRecorder
from settings import PROJECT_ROOT, configure_process

log = logging.getLogger("recserve")


def freeze_heap() -> None:
    # Loading torch, Feast and the bundle leaves millions of long-lived objects; unfrozen, every full GC walks
    # them all and stalls the loop for tens of ms under load.
    gc.collect()
    gc.freeze()


def trim_heap() -> None:
    """Hand freed memory back to the OS: Arrow's pool keeps what reading parquet allocated, and glibc keeps freed
    heap pages, so without this a replica's RSS after loading a bundle holds the load's transient peak."""
    import ctypes
    import ctypes.util

    import pyarrow

    pyarrow.default_memory_pool().release_unused()
    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            ctypes.CDLL(libc).malloc_trim(0)


@contextlib.contextmanager
def short_gil_turns(interval_s: float = 0.0005) -> Iterator[None]:
    """While a bundle loads on a worker thread, the interpreter asks a thread holding the GIL to hand it over after
    `interval_s` instead of the default 5 ms (sys.setswitchinterval): each request the event loop serves meanwhile
    waits for the GIL at every hand-over (each await on a socket or a stage's thread), so 5 ms a time adds up."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def local_stages(core: ServingCore, threads: int, compile_cache: Path | None = None) -> LocalStages:
    """The bundle's model stages in this process (the colocated topology); the blender's compiled trees cached in
    `compile_cache` (default: the temp dir)."""
    device = pick_device()
    return LocalStages(
        CFStage(ALSModel.load(core.path, core.settings.cf), device=device),
        ContentStage(ContentModel.load(core.path, device=device)).warm(),
        BlendStage(BlenderModel.load(core.path, num_threads=1, compile_cache=compile_cache)),
        threads=threads,
    )


def drift_log(chain: Chain, settings: AppArgs) -> None:
    """The chain's drift monitor logs its requests' features under settings.drift_log_dir when that is set; a bundle
    without a drift reference (trained before drift existed) is served with drift off, said here once."""
    if chain.drift is None:
        log.warning(
            "bundle %s has no drift reference: drift monitoring is off for it (retrain to turn it on)",
            chain.core.version,
        )
        return
    if settings.drift_log_dir is not None:
        chain.drift.log = DriftLog(settings.drift_log_dir, chain.core.version).append


def make_api(
    settings: AppArgs,
    stages: BundleStages | None = None,
    recorder: Callable[[str], Any] | None = None,
    compile_cache: Path | None = None,
) -> Api:
    """The ingress's Api over `stages`; None runs the models in this process (colocated), the blender's compiled
    trees cached in `compile_cache` (default: the temp dir). `recorder(version)` makes the metrics recorder."""
    bundle = local_bundle(settings.bundle_ref())  # a URI's bundle fetched into this node's cache, verified
    core = load_core(bundle)  # verifies every file's hash, once
    remote = stages
    stages = stages or local_stages(core, settings.stage_threads, compile_cache)
    recorder = recorder or (lambda _: NullRecorder())
    rec = recorder(core.version)
    store = settings.store
    try:
        features = OnlineFeatures.load(store, core.version, core.snapshot.item_ids.tolist())
    except RecserveError as exc:
        # Still serve: item features are the bundle's own (the same values, see test_store), users degrade.
        log.warning("feature store not usable at start (%s); serving bundle features until it is", exc)
        features = OnlineFeatures(store, core.version, core.snapshot.item_ids, core.snapshot.item_matrix)
    event_log = EventLog(store)
    watch = None
    if settings.watch_store:
        # After a total loss: event windows back from the log first, then the batch rows (whose marker ends it).
        watch = StoreWatch(
            store,
            core.version,
            bundle_materializer(store, bundle),
            rebuild_events=lambda: rebuild_realtime(event_log, api.writer),
            report=rec.feature_store,
        )
    store_state = (lambda: watch.status.state) if watch else None
    chain = Chain(core, features, stages, settings.knobs, rec, store_state=store_state)
    drift_log(chain, settings)

    def arm_chain(ref: str) -> Chain:
        # A rollout arm's bundle: verified, refused unless materialized (NotMaterializedError names the command).
        arm_core = load_core(local_bundle(ref))
        snap = arm_core.snapshot
        arm_features = OnlineFeatures.for_bundle(store, arm_core.version, snap.item_ids, snap.item_matrix)
        # Colocated: the arm's own models in this process. Distributed: the same model deployments, each call
        # carrying the bundle as its multiplexed model id (pipeline/serve/deployments.py).
        if remote is None:
            arm_stages: Stages = local_stages(arm_core, settings.stage_threads, compile_cache)
        else:
            arm_stages = remote.for_bundle(ref)
        arm = Chain(arm_core, arm_features, arm_stages, settings.knobs, recorder(arm_core.version), store_state)
        drift_log(arm, settings)
        trim_heap()  # what loading read and dropped (Arrow buffers, pandas frames) goes back to the OS
        return arm

    async def load(path: str) -> Chain:
        # A thread at the process's own priority: niced, it was preempted while holding the GIL, and the event
        # loop waited on it (p99 at 40 req/s rose from 58 to 710 ms during switches).
        with short_gil_turns():
            return await asyncio.to_thread(arm_chain, path)

    def writer() -> EventWriter:
        return EventWriter(open_store(store), store, settings.events)

    shared = redis_client(store)  # one connection pool for the rollout's state in Redis (it connects on first use)
    api = Api(
        chain,
        store,
        settings.events,
        writer,
        rec,
        watch,
        event_log,
        load=load,
        bundle_key=lambda ref: settings.model_copy(update={"bundle": ref}).bundle_ref(),
        ledger=RollbackLedger(store, shared),
        turns=LoadTurns(store, client=shared),
        outcomes=Outcomes(shared, store.project, settings.outcomes, rec),
        settle_s=settings.load_settle_s,
    )
    try:
        api.writer()  # now, not inside the first POST /events (opening Feast's registry takes ~0.7 s)
    except RecserveError as exc:
        log.warning("event writer not ready at start (%s); it will be made on the first event", exc)
    return api


def settings_from_config(config: Path) -> AppArgs:
    """The app args and the Ingress's user_config knobs of a serve config, so the floor runs what it runs."""
    try:
        app = yaml.safe_load(config.read_text())["applications"][0]
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"{config}: not a serve config with an application ({exc}): use deploy/serve_config.yaml"
        ) from exc
    ingress = next((d for d in app.get("deployments", []) if d.get("name") == "Ingress"), {})
    args = AppArgs.model_validate({**app.get("args", {}), "topology": "colocated"})
    user_config = {k: v for k, v in (ingress.get("user_config") or {}).items() if k != "rollout"}
    knobs = Knobs.model_validate({**args.knobs.model_dump(), **user_config})
    return args.model_copy(update={"knobs": knobs})


def rollout_from_config(config: Path) -> dict[str, Any] | None:
    """The Ingress's user_config `rollout` of a serve config (see chain/rollout.py), if it names one."""
    app = yaml.safe_load(config.read_text())["applications"][0]
    ingress = next((d for d in app.get("deployments", []) if d.get("name") == "Ingress"), {})
    return (ingress.get("user_config") or {}).get("rollout")


def main() -> int:
    p = argparse.ArgumentParser(description="recserve's Api under plain uvicorn, without Ray (the in-process floor)")
    p.add_argument("--config", type=Path, default=PROJECT_ROOT / "deploy" / "serve_config.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args()
    import uvicorn

    try:
        process = configure_process(torch=True)
        keys = KeyRing(process.auth)  # a bad key entry stops the start, naming it
        settings = settings_from_config(args.config)
        rollout = rollout_from_config(args.config)
        api = make_api(
            settings.model_copy(update={"bundle": settings.bundle_ref()}), compile_cache=process.compile_cache
        )
    except RecserveError as exc:
        print(f"pipeline.serve.local: error: {exc}", file=sys.stderr)
        return 2

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await api.start()  # warm-up, store watch and event-log flusher, as each Ray ingress replica runs them
        if rollout is not None:  # the config's arms, loaded as a replica loads them
            api.reconfigure({**settings.knobs.model_dump(), "rollout": rollout})
            await api.rollout.wait()
        yield
        await api.stop()

    app = build_api(
        lambda: api,
        max_body_bytes=settings.max_body_bytes,
        lifespan=lifespan,
        body_timeout_s=settings.body_timeout_s,
        keys=keys,
    )
    freeze_heap()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
