"""`recserve train`: fit CF, content and the blender for one cutoff and write a verified bundle."""

from __future__ import annotations

import datetime as dt
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from chain.offline import OfflineChain
from chain.retrieve import CFStage, ContentStage
from chain.score import BlendStage
from chain.types import Query
from models import bundle as bundle_mod
from models.blender import Blender
from models.cf import ALSModel
from models.content import ENCODER_NAME, ContentModel, encode, load_encoder
from models.data import CleanData, load_clean, sha256_file, summarize
from models.errors import ConfigError
from models.popularity import Popularity
from models.settings import TrainSettings
from models.snapshot import Snapshot
from models.split import Split, future_purchases, holdout_truth, resolve_split
from training.drift import drift_reference
from training.evaluate import Evaluation, evaluate


@dataclass
class TrainResult:
    path: Path
    manifest: bundle_mod.Manifest
    evaluation: Evaluation
    seconds: float


def _embed(texts: np.ndarray, cache: dict[str, np.ndarray], settings: TrainSettings, progress: bool) -> np.ndarray:
    """Embeddings for the given descriptions, encoding only the texts not seen before."""
    new = sorted({t for t in texts.tolist() if t not in cache})
    if new:
        encoder = load_encoder(num_threads=settings.num_threads)
        vecs = encode(encoder, new, settings.content.encode_batch_size, progress)
        cache.update(zip(new, vecs, strict=True))
    return np.stack([cache[t] for t in texts.tolist()]).astype(np.float32)


def _chain(
    snap: Snapshot, settings: TrainSettings, cache: dict[str, np.ndarray], blender: Blender | None, progress: bool
) -> OfflineChain:
    cf = ALSModel.fit(snap.times_bought, settings.cf, settings.seed, settings.num_threads, show_progress=progress)
    content = ContentModel(_embed(snap.descriptions, cache, settings, progress))
    return OfflineChain(
        snap,
        Popularity.fit(snap.item_matrix),
        settings,
        CFStage(cf),
        ContentStage(content),
        BlendStage(blender) if blender is not None else None,
    )


def blender_examples(
    chain: OfflineChain, labels: dict[str, set[str]], progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Feature rows, binary labels and group sizes for the users with at least one bought candidate: the
    candidates and rows a default request (k=10, no query, no events) gets from the serving chain."""
    snap = chain.snapshot
    users = [u for u in labels if u in snap.user_index]
    xs, ys, groups = [], [], []
    with tqdm(total=len(users), desc="blender examples", unit="user", disable=not progress, leave=False) as bar:
        for r in chain.retrieve_all(Query(u) for u in users):
            bought = labels[r.context.query.user_id]
            y = np.fromiter((i in bought for i in snap.item_ids[r.candidates.items]), bool, len(r.candidates))
            bar.update(1)
            if y.any():
                xs.append(chain.hydrate(r).x)
                ys.append(y.astype(np.float32))
                groups.append(len(r.candidates))
    return np.vstack(xs), np.concatenate(ys), np.asarray(groups, dtype=np.int64), len(users)


def train(
    data_path: Path,
    out: Path,
    cutoff: dt.date | None = None,
    version: str | None = None,
    settings: TrainSettings | None = None,
    progress: bool = True,
    data: CleanData | None = None,
) -> TrainResult:
    settings = settings or TrainSettings()
    started = time.perf_counter()
    created = dt.datetime.now(dt.UTC)
    version = bundle_mod.check_version_name(version or created.strftime("v%Y%m%d-%H%M%S"))
    target = out / version
    if target.exists():
        raise ConfigError(f"bundle {target} already exists: pass another --version, or delete that directory")

    steps = tqdm(total=7, desc="train", unit="step", disable=not progress)

    def step(name: str) -> None:
        steps.set_postfix_str(name)
        steps.update(1)

    data = data if data is not None else load_clean(data_path)
    split: Split = resolve_split(data, cutoff, settings.split)
    step("data loaded")
    half_life = settings.candidates.history_half_life_days
    inter = data.interactions
    val_snap = Snapshot.build(data.sales, inter, split.validation_start, half_life)
    final_snap = Snapshot.build(data.sales, inter, split.cutoff, half_life)
    step("snapshots built")

    cache: dict[str, np.ndarray] = {}
    val_chain = _chain(val_snap, settings, cache, None, progress)
    step("validation models fitted")
    labels = future_purchases(inter, split.validation_start, split.cutoff)
    x, y, groups, label_users = blender_examples(val_chain, labels, progress)
    step("blender examples built")
    blender, blender_stats = Blender.fit(x, y, groups, settings.blender, settings.seed, settings.num_threads)
    # Drift's reference: the validation window's traffic through the validation chain (training/drift.py).
    reference = drift_reference(val_chain, inter, split.validation_start, split.cutoff)
    step("blender fitted")
    chain = _chain(final_snap, settings, cache, blender, progress)
    step("final models fitted")

    tmp = out / f".{version}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [*final_snap.save(tmp, version), *chain.cf.model.save(tmp), *chain.content.model.save(tmp)]
    files += [*blender.save(tmp), *chain.popularity.save(tmp, final_snap.item_ids), *reference.save(tmp)]

    truth = holdout_truth(inter, split, set(final_snap.user_index))
    evaluation = evaluate(chain, truth, split.as_dict(), version)
    evaluation.extra = {"blender": blender_stats}
    step("evaluated")
    steps.close()

    meta = {
        "version": version,
        "created_at": created.isoformat(timespec="seconds"),
        "data": {"path": str(data_path), "sha256": sha256_file(data_path), "clean": summarize(data)},
        "split": split.as_dict(),
        "settings": settings.model_dump(mode="json"),
        "encoder": ENCODER_NAME,
        "catalog": {"items": len(final_snap.item_ids), "users": len(final_snap.user_ids)},
        "blender_training": {
            **blender_stats,
            "importance_gain": blender.importance(),
            "rows": int(x.shape[0]),
            "groups": int(groups.shape[0]),
            "label_users": label_users,
            "positive_rate": float(y.mean()),
        },
        "metrics": evaluation.as_dict(),
        "environment": {"python": platform.python_version(), **_versions()},
    }
    manifest = bundle_mod.write_manifest(tmp, files, meta)
    tmp.rename(target)
    (out / bundle_mod.LATEST_FILE).write_text(version + "\n")
    return TrainResult(target, manifest, evaluation, time.perf_counter() - started)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("implicit", "lightgbm", "sentence-transformers", "torch", "numpy", "pandas")}
