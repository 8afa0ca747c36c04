"""The rollout simulation: replay holdout users and their real purchases after the cutoff through the real Api (no
Ray) and the real Redis attribution, with two arms, and read the per-arm hit rate, its interval and the test.

    python loadtests/rollout_sim.py --challenger artifacts/weak [--champion artifacts/<v>] [--aa-runs 20]
                                    [--compare-runs 5] [--assignment-salts 10000] [--users N] [--k 10]
                                    [--deadline-ms 2000] [--out reports/rollout-sim]

One run, for one salt (each run draws the users onto the arms afresh):
1. every holdout user asks `Api.recommend` once (k items; the user's arm by the rollout's sticky assignment);
2. once the exposures are flushed to Redis, each user's real purchases in the 30 days after the bundle's cutoff
   (the evaluation's truth, items in the catalog only) are sent as `purchase` events through `Api.events`: the real
   validation, writer and attribution, stamped now, so inside the attribution window;
3. per arm, Redis's counts (answers, converted answers) give the hit rate (the share of answers with at least one
   item the user then bought), its Wilson interval and Fisher's exact test against the champion at alpha 0.05
   (models/hitrate.py). The run also counts the hits in the answers it got back itself: the two must agree.
Between runs the run's outcome keys are deleted and the users' event windows emptied (through the writer), so
every run starts from the same state.

Two experiments: **compare** (the champion against `--challenger`, 50/50; a better model should win, with
significance) and **A/A** (the champion against itself, 50/50, `--aa-runs` salts; the test should claim a
difference in about alpha of them at most: the false-positive rate). After the first A/A run, `assignment_aa`
redoes only the split of users over `--assignment-salts` more salts, with that run's per-user outcomes: the
false-positive rate of the assignment and the statistics, over far more salts than full runs allow.

Results: one line a run on stdout, and `<out>/summary.json` (every run's per-arm counts, intervals and test).

The bundles are materialized into a Feast project of the harness's own (`--project`, default `rollout_sim`, with
its registry and event log under var/rollout-sim/), never the default project; its keys are dropped at the end
unless `--keep`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from settings import PROJECT_ROOT, Settings, StoreSettings, configure_process

ROOT = PROJECT_ROOT
MAX_BATCH = 500  # events per /events call (EventSettings.max_batch)


@dataclass(frozen=True)
class Replay:
    """Who is replayed: the bundle's holdout users (bought before its cutoff and in the 30 days after) and, per
    user, the distinct catalog items they bought in those 30 days."""

    users: list[str]
    purchases: dict[str, list[str]]


def holdout_replay(bundle: Path, data: Any = None, users: int | None = None) -> Replay:
    """The replay of `bundle`'s split, from the real data (`data`: a models.data.CleanData; default: the shipped
    file). `users` keeps the first n users in id order (all by default)."""
    import pandas as pd

    from models.bundle import read_manifest
    from models.data import load_clean
    from models.split import holdout_truth, resolve_split
    from settings import DATA_FILE

    manifest = read_manifest(bundle)
    data = data if data is not None else load_clean(DATA_FILE)
    split = resolve_split(data, manifest.cutoff.date(), manifest.settings.split)
    known = set(pd.read_parquet(bundle / "user_features.parquet")["user_id"].astype(str))
    catalog = set(pd.read_parquet(bundle / "catalog.parquet")["item_id"].astype(str))
    truth = holdout_truth(data.interactions, split, known)
    bought = {u: sorted(items & catalog) for u, items in truth.items()}
    kept = sorted(u for u, items in bought.items() if items)[: users or None]
    return Replay(kept, {u: bought[u] for u in kept})


@dataclass(frozen=True)
class ArmResult:
    arm: str
    version: str
    weight: float
    answers: int  # Redis's count, cluster-wide
    converted: int  # Redis's count: answers converted by a purchase within the window
    expected: int  # answers the harness saw hold at least one item the user then bought
    degraded: int  # answers the harness saw flagged degraded (a stage missed its deadline or failed)
    rate: float
    low: float  # Wilson 95%
    high: float


@dataclass(frozen=True)
class RunResult:
    experiment: str  # "compare" or "aa"
    salt: str
    arms: list[ArmResult]
    difference: float  # challenger - champion hit rate
    p_value: float  # Fisher's exact, two-sided
    significant: bool  # p < alpha
    sample_ratio_p: float
    seconds: float
    recommend_ms_p50: float
    events_accepted: int
    attribution_failed: int = 0
    # Per user, whether the answer held an item the user then bought (for `assignment_aa`; not in the JSON).
    hits: dict[str, bool] = field(default_factory=dict, repr=False)


@dataclass
class Summary:
    command: str
    machine: dict[str, str]
    champion: str
    challenger: str | None
    users: int
    k: int
    deadline_ms: float
    alpha: float
    test: str
    runs: list[RunResult] = field(default_factory=list)
    assignment_aa: dict[str, Any] | None = None

    def of(self, experiment: str) -> list[RunResult]:
        return [r for r in self.runs if r.experiment == experiment]

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("compare", "aa"):
            runs = self.of(name)
            if runs:
                out[name] = {
                    "runs": len(runs),
                    "significant": sum(r.significant for r in runs),
                    "share_significant": sum(r.significant for r in runs) / len(runs),
                    "mean_difference": sum(r.difference for r in runs) / len(runs),
                    "mean_seconds_per_run": sum(r.seconds for r in runs) / len(runs),
                    "first_20_significant": sum(r.significant for r in runs[:20]),
                }
        if self.assignment_aa is not None:
            out["aa_by_assignment"] = self.assignment_aa
        return out

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for run in out["runs"]:
            run.pop("hits")
        return out


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def prepare_store(store: StoreSettings, bundles: Sequence[Path]) -> None:
    """Materialize each bundle into the harness's own project unless its marker is there already."""
    from models.bundle import read_manifest
    from models.errors import NotMaterializedError
    from pipeline.featurestore.store import materialize, open_store, require_materialized

    feast = None
    for bundle in dict.fromkeys(bundles):
        manifest = read_manifest(bundle)
        try:
            require_materialized(store, manifest.version, bundle)
        except NotMaterializedError:
            feast = feast or open_store(store)
            materialize(feast, store, bundle, manifest)


def drop_store(store: StoreSettings) -> int:
    from pipeline.featurestore.store import drop_project, open_store

    return drop_project(open_store(store), store)


def make_sim_api(
    champion: Path, store: StoreSettings, compile_cache: Path | None = None, deadline_ms: float = 2000.0
) -> Any:
    """The Api a colocated Ingress replica runs, over the harness's project (no store watch: nothing is lost).

    The deadline is long by default: on a shared 2-core machine the serving deadline (80 ms) degrades answers now
    and then, more often for the slower bundle, and the comparison is of the models, not of the machine's load."""
    from chain.knobs import Knobs
    from pipeline.serve.args import AppArgs
    from pipeline.serve.local import make_api

    args = AppArgs(bundle=champion, store=store, watch_store=False, knobs=Knobs(deadline_ms=deadline_ms))
    return make_api(args, compile_cache=compile_cache)


def spec_for(champion: Path, challenger: Path, salt: str) -> dict[str, Any]:
    from chain.rollout import ArmSpec, RolloutSpec

    arms = (
        ArmSpec(name="champion", role="champion", weight=50.0, bundle=str(champion)),
        ArmSpec(name="challenger", role="challenger", weight=50.0, bundle=str(challenger)),
    )
    return RolloutSpec(salt=salt, arms=arms).model_dump(mode="json")


class Attributions:
    """Counts the attribution failures the Api reports (its recorder's `outcome`), without Ray."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def outcome(self, outcome: str, n: int) -> None:
        if outcome == "attribution_failed":
            self.failed += n
        self.inner.outcome(outcome, n)


async def run_once(
    api: Any, experiment: str, champion: Path, challenger: Path, salt: str, replay: Replay, k: int
) -> RunResult:
    """One run for one salt (see the module); leaves no outcome keys and empty event windows behind."""
    from models.hitrate import hit_rate, sample_ratio_p, versus_champion
    from models.realtime import Realtime
    from pipeline.edge.schemas import RecommendRequest

    started = time.monotonic()
    api.reconfigure({**api.rollout.knobs.model_dump(), "rollout": spec_for(champion, challenger, salt)})
    state = await api.rollout.wait(600)
    if state.error:
        raise RuntimeError(f"the rollout did not switch: {state.error}")
    recorder = Attributions(api.recorder)
    api.recorder = recorder
    outcomes = api.outcomes
    expected: dict[str, int] = {}
    hits: dict[str, bool] = {}
    degraded: dict[str, int] = {}
    ms: list[float] = []
    for u in replay.users:
        t = time.perf_counter()
        rec = await api.recommend(RecommendRequest(user_id=u, k=k))
        ms.append((time.perf_counter() - t) * 1000)
        hit = bool(set(replay.purchases[u]) & {i.item_id for i in rec.items})
        hits[u] = hit
        expected[rec.arm] = expected.get(rec.arm, 0) + hit
        degraded[rec.arm] = degraded.get(rec.arm, 0) + rec.degraded
    # The flusher writes exposures every flush_s; wait for it rather than writing them from here.
    while outcomes.pending:
        await asyncio.sleep(outcomes.settings.flush_s)
    await asyncio.to_thread(outcomes.flush)  # the batch the flusher may hold in its thread right now

    accepted = 0
    for u in replay.users:
        items = replay.purchases[u]
        for lo in range(0, len(items), MAX_BATCH):
            batch = [
                {"user_id": u, "item_id": i, "event_type": "purchase", "event_id": f"{salt}:{u}:{i}"}
                for i in items[lo : lo + MAX_BATCH]
            ]
            accepted += await asyncio.to_thread(api.events, batch)
    api.recorder = recorder.inner

    counts = {c.arm: c for c in outcomes.counts(salt)}
    arms, rates = [], {}
    spec = api.rollout.arms.spec
    for a in spec.arms:
        c = counts.get(a.name)
        answers, converted = (c.answers, c.converted) if c else (0, 0)
        h = hit_rate(converted, answers)
        rates[a.name] = h
        version = c.version if c else "-"
        arms.append(
            ArmResult(
                a.name,
                version,
                a.weight,
                answers,
                converted,
                expected.get(a.name, 0),
                degraded.get(a.name, 0),
                h.rate,
                h.low,
                h.high,
            )
        )
    cmp = versus_champion(rates["challenger"], rates["champion"])
    srm = sample_ratio_p([r.answers for r in arms], [r.weight for r in arms])

    # Back to the starting state for the next run: this salt's keys, and the users' event windows.
    outcomes.clear(salt)
    writer = api.writer()
    for lo in range(0, len(replay.users), 200):
        users = replay.users[lo : lo + 200]
        await asyncio.to_thread(writer.update, users, lambda current, _now: {u: Realtime.empty() for u in current})
    ms.sort()
    return RunResult(
        experiment,
        salt,
        arms,
        cmp.difference,
        cmp.p_value,
        cmp.significant,
        srm,
        time.monotonic() - started,
        ms[len(ms) // 2] if ms else float("nan"),
        accepted,
        recorder.failed,
        hits,
    )


def assignment_aa(hits: dict[str, bool], champion: Path, salts: Sequence[str]) -> dict[str, Any]:
    """The A/A false-positive rate of the status's statistics over many salts, without the Api: each user's
    outcome fixed to what an honest run measured (`hits`, one A/A run's; the answers of one bundle do not depend on
    the arm), each salt's assignment by the rollout's own `assign`, then the same Wilson/Fisher code as `rollout
    status`. It checks the statistics and the assignment over far more salts than full runs allow; the full runs
    check that Redis counts what the answers hold."""
    from chain.rollout import RolloutSpec, assign
    from models.hitrate import hit_rate, versus_champion

    significant = 0
    for salt in salts:
        spec = RolloutSpec.model_validate(spec_for(champion, champion, salt))
        n = {"champion": [0, 0], "challenger": [0, 0]}
        for u, hit in hits.items():
            row = n[assign(u, spec).name]
            row[0] += hit
            row[1] += 1
        rates = {arm: hit_rate(k, total) for arm, (k, total) in n.items()}
        significant += versus_champion(rates["challenger"], rates["champion"]).significant
    return {"salts": len(salts), "significant": significant, "share_significant": significant / max(len(salts), 1)}


def exact_aa_size(users: int, converting: int, alpha: float | None = None) -> float:
    """The exact false-positive rate of `rollout status`'s test in an A/A run where `converting` of `users` convert
    whatever their arm and each user is on either arm with probability 1/2: the probability, over the binomial arm
    size and then the hypergeometric split of the converting users (the randomization distribution), that Fisher's
    two-sided test rejects at `alpha` (default ALPHA). Arm sizes beyond 6 standard deviations of n/2 are left out
    (their probability is below 1e-8)."""
    import math

    from scipy import stats

    from models.hitrate import ALPHA

    alpha = ALPHA if alpha is None else alpha
    half, spread = users / 2, 6 * math.sqrt(users) / 2
    size = 0.0
    for n1 in range(max(1, math.floor(half - spread)), min(users - 1, math.ceil(half + spread)) + 1):
        lo, hi = max(0, converting - (users - n1)), min(converting, n1)
        rejected = 0.0
        for k in range(lo, hi + 1):
            table = [[k, n1 - k], [converting - k, users - n1 - (converting - k)]]
            if stats.fisher_exact(table).pvalue < alpha:
                rejected += float(stats.hypergeom.pmf(k, users, converting, n1))
        size += float(stats.binom.pmf(n1, users, 0.5)) * rejected
    return size


def describe(r: RunResult) -> str:
    arms = "  ".join(
        f"{a.arm} {a.converted}/{a.answers} = {a.rate:.3f} [{a.low:.3f}, {a.high:.3f}]"
        + ("" if a.converted == a.expected else f" (harness saw {a.expected})")
        + (f" ({a.degraded} degraded)" if a.degraded else "")
        for a in r.arms
    )
    verdict = "SIGNIFICANT" if r.significant else "no difference"
    return (
        f"{r.experiment:<7} salt {r.salt:<18} {arms}  diff {r.difference:+.3f} p={r.p_value:.4f} {verdict}  "
        f"SRM p={r.sample_ratio_p:.2f}  {r.seconds:.1f} s"
    )


async def simulate(
    api: Any,
    champion: Path,
    challenger: Path | None,
    replay: Replay,
    compare_runs: int,
    aa_runs: int,
    k: int,
    tag: str,
    summary: Summary,
    progress: bool = True,
    assignment_salts: int = 0,
) -> Summary:
    """The compare runs (when there is a challenger), then the A/A runs, appended to `summary`; after the first
    A/A run, `assignment_aa` over `assignment_salts` salts (0: not)."""
    await api.start()
    try:
        plans = [("compare", challenger, i) for i in range(compare_runs if challenger else 0)]
        plans += [("aa", champion, i) for i in range(aa_runs)]
        for experiment, other, i in plans:
            assert other is not None
            result = await run_once(api, experiment, champion, other, f"{tag}-{experiment}-{i}", replay, k)
            summary.runs.append(result)
            if experiment == "aa" and assignment_salts and summary.assignment_aa is None:
                salts = [f"{tag}-assign-{j}" for j in range(assignment_salts)]
                summary.assignment_aa = assignment_aa(result.hits, champion, salts)
                if progress:
                    a = summary.assignment_aa
                    print(
                        f"A/A by assignment alone over {a['salts']} salts: {a['significant']} significant "
                        f"({a['share_significant']:.2%})",
                        flush=True,
                    )
            if progress:
                print(describe(result), flush=True)
    finally:
        await api.stop()
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--champion", type=Path, help="default: the bundle <artifacts>/LATEST names")
    p.add_argument("--challenger", type=Path, help="a second bundle for the compare runs (none: A/A only)")
    p.add_argument("--compare-runs", type=int, default=5, help="salts for champion vs challenger")
    p.add_argument("--aa-runs", type=int, default=20, help="salts for champion vs itself")
    p.add_argument(
        "--assignment-salts",
        type=int,
        default=10_000,
        help="after the first A/A run: the A/A false-positive rate over this many more salts by assignment alone",
    )
    p.add_argument("--users", type=int, default=None, help="replay only the first n holdout users (default: all)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--deadline-ms", type=float, default=2000.0, help="the chain's deadline (serving's is 80 ms)")
    p.add_argument("--project", default="rollout_sim", help="the Feast project of the harness's own")
    p.add_argument("--keep", action="store_true", help="keep the project's keys in Redis afterwards")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "rollout-sim")
    args = p.parse_args()

    process = configure_process(torch=True)
    champion = (args.champion or Settings().latest_bundle()).resolve()
    challenger = args.challenger.resolve() if args.challenger else None
    var = ROOT / "var" / "rollout-sim"
    store = StoreSettings(project=args.project, registry=var / "registry.db", event_log_dir=var / "event_log")
    from models.hitrate import ALPHA, TEST_NAME

    prepare_store(store, [champion, *([challenger] if challenger else [])])
    replay = holdout_replay(champion, users=args.users)
    print(f"replaying {len(replay.users)} holdout users of {champion.name}; project {store.project}", flush=True)
    api = make_sim_api(champion, store, process.compile_cache, args.deadline_ms)
    summary = Summary(
        command=" ".join(["python", *sys.argv]),
        machine=machine(),
        champion=str(champion),
        challenger=str(challenger) if challenger else None,
        users=len(replay.users),
        k=args.k,
        deadline_ms=args.deadline_ms,
        alpha=ALPHA,
        test=TEST_NAME,
    )
    tag = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    try:
        asyncio.run(
            simulate(
                api,
                champion,
                challenger,
                replay,
                args.compare_runs,
                args.aa_runs,
                args.k,
                tag,
                summary,
                assignment_salts=args.assignment_salts,
            )
        )
    finally:
        if not args.keep:
            drop_store(store)
    if summary.assignment_aa is not None:
        first = summary.of("aa")[0].hits  # ~40 s of CPU for 1,387 users: here, not in the test's smoke run
        summary.assignment_aa["exact_size"] = exact_aa_size(len(first), sum(first.values()))
    figures = summary.figures()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(
        json.dumps({**summary.as_dict(), "figures": figures}, indent=2, default=str) + "\n"
    )
    for name in ("compare", "aa"):
        if f := figures.get(name):
            print(
                f"{name}: {f['significant']} of {f['runs']} runs significant at alpha {ALPHA} "
                f"({f['share_significant']:.1%}; the first 20: {f['first_20_significant']}); mean difference "
                f"{f['mean_difference']:+.4f}; {f['mean_seconds_per_run']:.1f} s a run"
            )
    if a := figures.get("aa_by_assignment"):
        share = a["share_significant"]
        print(
            f"A/A by assignment alone: {a['significant']} of {a['salts']} salts significant ({share:.2%}); the "
            f"test's exact false-positive rate for these counts: {a['exact_size']:.2%}"
        )
    print(f"wrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
