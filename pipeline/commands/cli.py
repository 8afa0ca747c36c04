"""The `recserve` command. Subcommands import their heavy modules lazily, so `--help` is instant and works whatever
the environment holds. `main` then reads the settings (settings.Settings: a bad RECSERVE_* value exits 2 with its
name) and prepares the process before any subcommand loads numpy.

Paths given on the command line are taken from the current directory; the defaults (the artifacts root, the data,
the serve config) are the project's own, from any directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from settings import Settings

ARTIFACTS_HELP = "artifacts root (default: RECSERVE_ARTIFACTS, else the project's artifacts/)"
BUNDLE_HELP = "bundle directory or URI, e.g. s3://bucket/bundles/<version>/ (default: the one artifacts/LATEST names)"


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: write it as YYYY-MM-DD, e.g. 2011-11-09") from None


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _bundle(args: argparse.Namespace, settings: Settings) -> Path:
    """--bundle (a URI is fetched into this node's cache and verified), else the one LATEST names under
    --artifacts (else the settings' artifacts root)."""
    from models import bundle as bundle_mod
    from models.remote import is_uri
    from pipeline.serve.args import local_bundle

    if args.bundle is not None and is_uri(args.bundle):
        return local_bundle(args.bundle, settings.bundle_cache)
    return bundle_mod.resolve(args.bundle and Path(args.bundle), args.artifacts or settings.artifacts)


def _data(args: argparse.Namespace) -> Path:
    from settings import DATA_FILE

    return args.data or DATA_FILE


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from models.remote import is_uri
    from models.settings import TrainSettings
    from training.train import train

    publish_to = args.out if args.out and is_uri(args.out) else None
    result = train(
        data_path=_data(args),
        # Trained locally (under the artifacts root) first, then published: a URI never holds half a bundle.
        out=Path(args.out) if args.out and not publish_to else settings.artifacts,
        cutoff=args.cutoff,
        version=args.version,
        settings=_load_settings(args.settings) if args.settings else TrainSettings(),
        progress=_progress(args),
    )
    ev = result.evaluation
    print(ev.table())
    print(
        f"trained bundle {result.manifest.version} at {result.path} in {result.seconds:.0f} s "
        f"(cutoff {ev.split['cutoff'][:10]}); {ev.summary()}"
    )
    if publish_to:
        print(f"published bundle {result.manifest.version} to {_publish(result.path, publish_to)}")
    return 0


def _publish(directory: Path, uri: str) -> str:
    from models.bundle import verified
    from models.remote import publish

    verified(directory)  # only a bundle whose every file matches its manifest goes out
    return publish(directory, uri)


def cmd_bundle_push(args: argparse.Namespace, settings: Settings) -> int:
    uri = _publish(Path(args.directory), args.uri)
    print(f"published bundle {Path(args.directory).name} to {uri}")
    return 0


def cmd_bundle_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.serve.args import local_bundle

    path = local_bundle(args.uri, args.cache or settings.bundle_cache)
    print(path)
    return 0


def _load_settings(path: Path):  # noqa: ANN202 - returns TrainSettings, imported lazily
    from pydantic import ValidationError

    from models.errors import ConfigError
    from models.settings import TrainSettings

    try:
        return TrainSettings.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--settings {path} does not exist: pass a JSON file of TrainSettings fields") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"--settings {path}: field {field!r}: {first['msg']}") from None


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    import random

    from tqdm.auto import tqdm

    from chain.offline import open_offline
    from models import bundle as bundle_mod
    from models.data import load_clean, sha256_file
    from models.errors import DataError
    from models.split import holdout_truth, resolve_split
    from training.evaluate import evaluate, query_steering
    from training.queries import PRODUCT_QUERIES

    path = _bundle(args, settings)
    chain = open_offline(path, compile_cache=settings.compile_cache)
    manifest = bundle_mod.read_manifest(path)
    recorded = manifest.data["sha256"]
    data_path = _data(args)
    if sha256_file(data_path) != recorded:
        raise DataError(
            f"{data_path} is not the data bundle {chain.version} was trained on (sha256 {recorded[:12]}…): "
            "pass that file with --data, or retrain"
        )
    data = load_clean(data_path)
    split = resolve_split(data, manifest.cutoff.date(), chain.settings.split)
    truth = holdout_truth(data.interactions, split, set(chain.snapshot.user_index))
    with tqdm(total=len(truth), desc="evaluate", unit="user", disable=not _progress(args)) as bar:
        ev = evaluate(chain, truth, split.as_dict(), chain.version, progress=bar.update)
    users = random.Random(0).sample(sorted(truth), min(50, len(truth)))
    steering = query_steering(chain, users, PRODUCT_QUERIES)
    ev.extra["query_steering"] = {"mean": steering.mean, "worst": steering.worst, "pairs": len(steering.hits)}
    print(ev.table())
    print(steering.summary())
    json_path = args.json or path / "evaluation.json"
    plot_path = args.plot or path / "evaluation.png"
    ev.write_json(json_path)
    ev.plot(plot_path)
    print(f"evaluated bundle {chain.version}: {ev.summary()}; wrote {json_path} and {plot_path}")
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.commands.replay import replay

    path = _bundle(args, settings)
    n = replay(args.requests, path, args.out, compile_cache=settings.compile_cache)
    print(f"replayed {n} requests through bundle {path.name}'s chain into {args.out}")
    return 0


def cmd_drift_report(args: argparse.Namespace, settings: Settings) -> int:
    from models.bundle import load_core
    from models.errors import ConfigError
    from pipeline.commands.drift import parse_window, report, table
    from pipeline.serve.driftlog import read_window

    seconds = parse_window(args.window)
    core = load_core(_bundle(args, settings))
    if core.drift is None:
        raise ConfigError(f"bundle {core.version} has no drift reference (trained before drift existed): retrain it")
    logged = read_window(args.log_dir or settings.drift_log_dir, core.version, seconds)
    verdicts = report(core.drift, logged, args.out)
    print(table(verdicts))
    print(f"{len(logged)} requests of the last {args.window} against bundle {core.version}'s reference: {args.out}")
    return 0


def _store(args: argparse.Namespace, settings: Settings):  # noqa: ANN202 - (StoreSettings, FeatureStore), lazily
    from pipeline.featurestore.store import open_store
    from settings import StoreSettings

    store_settings = StoreSettings(project=args.project) if args.project else settings.store
    return store_settings, open_store(store_settings)


def cmd_features_apply(args: argparse.Namespace, settings: Settings) -> int:
    from models import bundle as bundle_mod
    from pipeline.featurestore.store import apply

    path = _bundle(args, settings)
    bundle_mod.read_manifest(path)
    store_settings, store = _store(args, settings)
    for line in apply(store, path, store_settings.event_log_dir):
        print(f"applied {line}")
    print(
        f"feature store ready: project {store_settings.project}, registry {store_settings.registry}, "
        f"Redis {store_settings.redis}"
    )
    return 0


def cmd_features_materialize(args: argparse.Namespace, settings: Settings) -> int:
    from models import bundle as bundle_mod
    from pipeline.featurestore.store import materialize

    path = _bundle(args, settings)
    manifest = bundle_mod.read_manifest(path)
    bundle_mod.verify(path, manifest)
    store_settings, store = _store(args, settings)
    record = materialize(store, store_settings, path, manifest)
    print(
        f"materialized bundle {manifest.version} into project {store_settings.project}: {record['users']} users, "
        f"{record['items']} items (as of {record['cutoff'][:10]}); other bundles' rows are untouched"
    )
    return 0


def cmd_features_bench(args: argparse.Namespace, settings: Settings) -> int:
    from models import bundle as bundle_mod
    from pipeline.featurestore.bench import run

    path = _bundle(args, settings)
    manifest = bundle_mod.read_manifest(path)
    bundle_mod.verify(path, manifest)
    report = run(path, manifest, settings.store, reads=args.reads, events=args.events, seed=args.seed)
    print(report)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.commands.serve import serve

    config = args.config or settings.project_root / "deploy" / "serve_config.yaml"
    return serve(config, args.timeout, args.num_cpus, tuned=not args.ray_defaults, settings=settings)


def _data_and_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="Online Retail parquet (default: the project's shipped copy)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def cmd_rollout(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.commands import rollout

    base = args.url.rstrip("/")
    if args.rollout_command == "start" and (
        (args.canary is not None and args.ab is not None) or (args.canary, args.ab, args.shadow) == (None,) * 3
    ):
        from models.errors import ConfigError

        raise ConfigError(
            "give one of --canary PCT or --ab PCT (the share of users the new bundle serves), and/or --shadow PCT "
            "(the share of requests it answers too, unseen)"
        )
    given = settings.auth.api_key
    key = args.key or (given.get_secret_value() if given is not None else None)
    # Serve's config API (a Ray driver) cannot check our keys: the service's admin route must accept this key first.
    rollout.require_admin(base, key)
    if args.rollout_command == "start":
        spec = rollout.start(
            args.bundle, args.canary, args.ab, args.salt, args.tolerance, base, settings.serve, shadow=args.shadow
        )
    elif args.rollout_command == "promote":
        spec = rollout.promote(base, settings.serve)
    elif args.rollout_command == "rollback":
        spec = rollout.rollback(base, settings.serve)
    else:
        print(rollout.status(base, settings.serve, as_json=args.json))
        return 0
    print(f"serving: {', '.join(f'{a.name} {a.weight:g}% ({a.bundle})' for a in spec.arms)} (salt {spec.salt!r})")
    return 0


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.commands.keys import create

    path = args.file or settings.auth.api_keys_file
    scopes = tuple(s.strip() for s in args.scope.split(",") if s.strip())
    key = create(args.name, scopes, path)
    print(
        f"created API key {args.name!r} (scope {','.join(scopes)}); its sha256 digest is in {path}.\n"
        "The key is shown this once; store it now (a running service reads the file again within a second):\n\n"
        f"{key}\n\n"
        'use:  KEY=<the key above>; curl -H "Authorization: Bearer $KEY" ...   (recserve rollout: --key or '
        "RECSERVE_API_KEY)"
    )
    return 0


def cmd_deploy_check_k8s(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.deploycheck import k8s

    crd = k8s.crd_path()
    if crd is None:
        print(f"note: no {k8s.CRD_FILE} in <repo>/../shared/k8s/: the RayService is not checked against its CRD")
    failed = 0
    for name in args.overlays or k8s.OVERLAYS:
        overlay = Path(name) if "/" in name else k8s.OVERLAYS_DIR / name
        problems = k8s.check_overlay(overlay, crd, app_args=not args.no_app_args)
        for problem in problems:
            print(f"{overlay}: {problem}")
        print(f"{overlay}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        failed += bool(problems)
    return 1 if failed else 0


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give a percent of users, e.g. 10") from None
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"{value:g} is not a share between 0 and 100 (exclusive)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recserve",
        description="Ensemble recommendation pipeline: train on UCI Online Retail, evaluate, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train",
        help="train CF, content and the blender; write a versioned bundle",
        description="Train all three models for one cutoff, write artifacts/<version>/ with a hashed manifest, "
        "and evaluate the bundle on the holdout after the cutoff.",
    )
    train.add_argument("--cutoff", type=_date, help="split date YYYY-MM-DD (default: 30 days before the last invoice)")
    train.add_argument(
        "--out",
        help=f"{ARTIFACTS_HELP}; or a URI prefix (s3://bucket/bundles/): the bundle is trained under the artifacts "
        "root, then published to <prefix>/<version>/, manifest last",
    )
    train.add_argument("--version", help="bundle name (default: v<UTC timestamp>)")
    train.add_argument("--settings", type=Path, help="JSON file overriding TrainSettings fields")
    _data_and_quiet(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "evaluate",
        help="evaluate a bundle on its holdout: table, JSON and PNG chart",
        description="Score popularity, repeat-history, CF, content and the blend on the users who bought both "
        "before and after the bundle's cutoff.",
    )
    ev.add_argument("--bundle", help=BUNDLE_HELP)
    ev.add_argument("--artifacts", type=Path, help=ARTIFACTS_HELP)
    ev.add_argument("--json", type=Path, help="metrics JSON path (default: <bundle>/evaluation.json)")
    ev.add_argument("--plot", type=Path, help="PNG chart path (default: <bundle>/evaluation.png)")
    _data_and_quiet(ev)
    ev.set_defaults(func=cmd_evaluate)

    rep = sub.add_parser(
        "replay",
        help="answer logged requests offline through the serving chain",
        description="Run each line of a JSON-lines file ({user_id, k, exclude, query, events}) through the same "
        "recommendation chain the service runs, over the bundle's own features and the line's session events, "
        "and write one answer per line.",
    )
    rep.add_argument("--requests", type=Path, required=True, help="JSON-lines file of requests")
    rep.add_argument("--out", type=Path, required=True, help="JSON-lines file of answers to write")
    rep.add_argument("--bundle", help=BUNDLE_HELP)
    rep.add_argument("--artifacts", type=Path, help=ARTIFACTS_HELP)
    rep.set_defaults(func=cmd_replay)

    drift = sub.add_parser(
        "drift", help="drift of serving's inputs from the bundle's training reference", description="Drift reports."
    )
    dsub_drift = drift.add_subparsers(dest="drift_command", metavar="ACTION", required=True)
    dr = dsub_drift.add_parser(
        "report",
        help="an Evidently report of the logged request features of a time window against the bundle's reference",
        description="Read the request features the replicas logged (drift_log_dir) in the last --window, write an "
        "Evidently HTML report against the bundle's reference (each value as its reference bin, the reference as "
        "its stored bin shares), and print per feature the gauges' and Evidently's PSI, JS distance and verdict.",
    )
    dr.add_argument("--window", default="1h", help="how far back: e.g. 30m, 1h, 2d (default 1h)")
    dr.add_argument("--out", type=Path, default=Path("drift_report.html"), help="HTML report to write")
    dr.add_argument("--log-dir", type=Path, help="the replicas' drift log (default: RECSERVE_DRIFT_LOG_DIR)")
    dr.add_argument("--bundle", help=BUNDLE_HELP)
    dr.add_argument("--artifacts", type=Path, help=ARTIFACTS_HELP)
    dr.set_defaults(func=cmd_drift_report)

    feats = sub.add_parser(
        "features",
        help="the Feast feature store on Redis: apply, materialize a bundle, benchmark the read path",
        description="Register the Feast definitions (feature_repo/) and load a bundle's batch features into Redis. "
        "Redis comes from RECSERVE_REDIS (default localhost:6379); the project from RECSERVE_FEAST_PROJECT "
        "(default recserve).",
    )
    fsub = feats.add_subparsers(dest="features_command", metavar="ACTION", required=True)
    for name, func, text in (
        ("apply", cmd_features_apply, "register entities, sources, views and services (idempotent)"),
        ("materialize", cmd_features_materialize, "apply, then load the bundle's batch features (idempotent)"),
        ("bench", cmd_features_bench, "time hydration reads and event-to-visible in a scratch project"),
    ):
        p = fsub.add_parser(name, help=text, description=text)
        p.add_argument("--bundle", help=BUNDLE_HELP)
        p.add_argument("--artifacts", type=Path, help=ARTIFACTS_HELP)
        if name == "bench":
            p.add_argument("--reads", type=int, default=5000, help="hydration reads to time (default: %(default)s)")
            p.add_argument("--events", type=int, default=1000, help="event writes to time (default: %(default)s)")
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--project", help="Feast project (default: RECSERVE_FEAST_PROJECT or recserve)")
        p.set_defaults(func=func)

    srv = sub.add_parser(
        "serve",
        help="run the recommendation service on Ray Serve until SIGTERM or Ctrl-C",
        description="Start a local Ray head (port 6380) unless one runs at RAY_ADDRESS, `serve run` the config, "
        "wait until every replica is up and warm, and print the client URL (HAProxy on the config's HTTP port, "
        "8000) and a curl line. On SIGTERM or Ctrl-C it shuts the app down and stops the Ray it started, by its "
        "process ids. Ports and folders come from RECSERVE_* variables (settings.ServeSettings).",
    )
    srv.add_argument("--config", type=Path, help="serve config (default: the project's deploy/serve_config.yaml)")
    srv.add_argument("--timeout", type=float, default=300, help="seconds to wait for the app (default: %(default)s)")
    srv.add_argument("--num-cpus", type=int, help="CPUs for a Ray head it starts (default: all)")
    srv.add_argument(
        "--ray-defaults",
        action="store_true",
        help="run Ray and Serve with their default settings: no throughput-optimized mode, no HAProxy, clients "
        "through Serve's proxy (the naive baseline of loadtests/bench.py)",
    )
    srv.set_defaults(func=cmd_serve)

    ro = sub.add_parser(
        "rollout",
        help="roll a bundle out to the running service: canary or A/B arms, status, promote, rollback",
        description="Change the running application's arms (sticky per user) through Serve's own config API; no "
        "replica restarts. Each replica loads a new bundle in the background, warms it and swaps.",
    )
    rsub = ro.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    start = rsub.add_parser("start", help="add a bundle as a canary or an A/B challenger beside the champion")
    start.add_argument("--bundle", required=True, help="the candidate bundle's directory or URI (s3://...)")
    start.add_argument("--canary", type=_percent, metavar="PCT", help="percent of users on the candidate (canary)")
    start.add_argument("--ab", type=_percent, metavar="PCT", help="percent of users on the candidate (A/B test)")
    start.add_argument(
        "--shadow",
        type=_percent,
        metavar="PCT",
        help="percent of requests the candidate answers too, off the callers' path, to compare (no user sees it)",
    )
    start.add_argument("--salt", help="the experiment's salt (default: the candidate's version): a new one re-draws")
    start.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="refuse a candidate whose offline blend NDCG@10 is below the champion's by more (default: %(default)s)",
    )
    for name, text in (
        (
            "status",
            "print per arm: share, requests, p50/p99, error and degraded rates, conversions, hit rate with a 95% "
            "Wilson interval, and Fisher's exact test against the champion (alpha 0.05)",
        ),
        ("promote", "make the challenger or canary the champion for every user"),
        ("rollback", "put every user back on the champion"),
    ):
        rsub.add_parser(name, help=text, description=text)
    rsub.choices["status"].add_argument("--json", action="store_true", help="print the status as JSON")
    for p in rsub.choices.values():
        p.add_argument("--url", default="http://127.0.0.1:8000", help="the service's URL (default: %(default)s)")
        p.add_argument(
            "--key",
            help="an API key with scope admin (default: RECSERVE_API_KEY); checked against the service's "
            "GET /admin/rollout before anything changes",
        )
    ro.set_defaults(func=cmd_rollout)

    bun = sub.add_parser(
        "bundle",
        help="publish a bundle to object storage, or fetch one into this node's cache",
        description="Bundles by URI (s3://bucket/prefix/<version>/), through pyarrow.fs and the standard AWS "
        "variables (AWS_ENDPOINT_URL for an S3 API server other than AWS). A publish writes every file, then the "
        "manifest; a fetch verifies every file's sha256 and installs the bundle atomically (models/remote.py).",
    )
    bsub = bun.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    push = bsub.add_parser("push", help="verify DIR, then publish it under URI (a prefix, or <prefix>/<version>/)")
    push.add_argument("directory", help="the bundle's directory")
    push.add_argument("uri", help="s3://bucket/prefix/ (the bundle goes to <prefix>/<version>/)")
    push.set_defaults(func=cmd_bundle_push)
    fetch = bsub.add_parser("fetch", help="fetch URI into this node's cache, verified; print the local directory")
    fetch.add_argument("uri", help="the bundle's URI, s3://bucket/prefix/<version>/")
    fetch.add_argument("--cache", type=Path, help="the cache folder (default: RECSERVE_BUNDLE_CACHE)")
    fetch.set_defaults(func=cmd_bundle_fetch)

    dep = sub.add_parser(
        "deploy",
        help="check deployment manifests without a cluster",
        description="Checks of deploy/ that need no cluster.",
    )
    dsub = dep.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)
    ck = dsub.add_parser(
        "check-k8s",
        help="render deploy/k8s overlays and check them: CRD schema, Serve config, app args, fit, Kubernetes schemas",
        description="Render each overlay with `kubectl kustomize` (offline) and check the RayService against "
        "KubeRay's CRD (strict), its serveConfigV2 against Ray Serve's schema and the app's AppArgs, that every "
        "deployment's replicas fit the worker group its label_selector picks, and the other objects against "
        "Kubernetes' schemas (pipeline/deploycheck/k8s.py). Exit 1 when any problem is found.",
    )
    ck.add_argument("overlays", nargs="*", metavar="OVERLAY", help="gpu, cpu-only or a path (default: both)")
    ck.add_argument(
        "--no-app-args", action="store_true", help="skip the AppArgs check (it imports torch and Feast: ~15 s)"
    )
    ck.set_defaults(func=cmd_deploy_check_k8s)

    keys = sub.add_parser(
        "keys",
        help="API keys for POST /events (events:write) and the admin routes (admin)",
        description="The service holds sha256 digests of its API keys, from RECSERVE_API_KEYS and the keys file "
        "(RECSERVE_API_KEYS_FILE, default .recserve/api-keys in the project). Clients send Authorization: Bearer "
        "<key>.",
    )
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = ksub.add_parser(
        "create",
        help="make a key, print it once, append its digest to the keys file",
        description="Make a random key (256 bits), print it once, and append `<name> <sha256> <scopes>` to the keys "
        "file (created readable by its owner only). Two keys can be valid at once: to rotate, create the new one, "
        "move the clients, delete the old line.",
    )
    create.add_argument("--name", required=True, help="the key's name, e.g. ci-events (unique in the file)")
    create.add_argument(
        "--scope", required=True, help="events:write, admin, or both comma-separated (admin implies every scope)"
    )
    create.add_argument("--file", type=Path, help="the keys file (default: RECSERVE_API_KEYS_FILE)")
    create.set_defaults(func=cmd_keys_create)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.errors import RecserveError
    from settings import configure_process

    try:
        # Before any subcommand imports numpy: OpenBLAS reads its thread count when it loads.
        settings = configure_process()
        return int(args.func(args, settings))
    except RecserveError as exc:
        print(f"recserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
