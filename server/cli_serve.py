"""`muse serve`, `muse deploy` and `muse keys`."""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

import msgspec

from muse.core.deploy import DeploymentStore
from muse.core.registry import Registry
from muse.core.spec import SpecError, encode_spec

from .settings import DEFAULTS, Settings, to_environment


def cmd_serve(args: argparse.Namespace) -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops

    from .auth import keys_path, read_keys

    registry = pathlib.Path(args.registry).resolve()
    if not registry.is_dir():
        raise SpecError(f"{registry}: no such registry directory; create one with `muse compile --registry {registry}`")
    if not args.no_auth and not read_keys(keys_path(registry)).keys:
        print(
            f"muse serve: warning: {keys_path(registry)} holds no keys, so every scoring request will get 401; "
            "add one with `muse keys add --tenant T` or pass --no-auth",
            file=sys.stderr,
        )
    if DeploymentStore(Registry(registry)).current_generation() is None:
        print(
            "muse serve: warning: nothing is deployed yet; the server stays not-ready until "
            "`muse deploy apply` publishes a deployment",
            file=sys.stderr,
        )
    score_log = None
    if args.score_log_sample > 0:
        score_log = str(pathlib.Path(args.score_log or registry / "scorelog").resolve())
    try:
        settings = msgspec.convert(
            dict(
                registry=str(registry),
                auth=not args.no_auth,
                max_body_bytes=args.max_body_bytes,
                score_log=score_log,
                score_log_sample=args.score_log_sample,
                score_log_max_bytes=args.score_log_max_mb << 20,
                score_log_flush_seconds=args.score_log_flush_seconds,
            ),
            Settings,
        )
    except msgspec.ValidationError as exc:
        raise ValueError(f"{exc}; see `muse serve --help`") from None
    to_environment(settings)
    # Polars (the score log) would start a thread per core in every worker and compete with the
    # request path for the CPU; one background thread per worker is plenty.
    os.environ.setdefault("POLARS_MAX_THREADS", "1")
    metrics_dir = None
    if args.workers > 1:  # every worker writes its metrics here; /metrics merges them
        metrics_dir = tempfile.mkdtemp(prefix="muse-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        Granian(
            "muse.server.app:create_app",
            factory=True,
            interface=Interfaces.ASGI,
            loop=Loops.uvloop,
            address=args.host,
            port=args.port,
            workers=args.workers,
            backlog=args.backlog,
            log_access=args.access_log,
            websockets=False,
        ).serve()
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def cmd_deploy(args: argparse.Namespace) -> None:
    store = DeploymentStore(Registry(args.registry))
    if args.action == "show":
        generation = store.current_generation()
        if generation is None:
            print(f"nothing deployed in {store.dir}")
            return
        print(f"# generation {generation} ({store.path(generation)})")
        sys.stdout.write(encode_spec(store.read(generation)).decode())
        return
    if args.file is None:
        raise ValueError(f"`muse deploy {args.action}` needs the deployment file: muse deploy {args.action} FILE.toml")
    spec = store.load_file(args.file)
    if args.action == "validate":
        store.validate(spec, source=str(args.file))
        print(f"{args.file}: valid ({len(spec.predictors)} predictors, {len(spec.routes)} routes)")
    else:
        generation = store.apply(spec, source=str(args.file))
        print(
            f"{args.file}: published as generation {generation} ({store.path(generation)}); "
            "running servers switch within a second"
        )


def cmd_promote(args: argparse.Namespace) -> None:
    store = DeploymentStore(Registry(args.registry))
    generation = store.promote(args.predictor, args.tenant)
    print(f"published generation {generation}: {store.read(generation).description}")


def cmd_rollback(args: argparse.Namespace) -> None:
    store = DeploymentStore(Registry(args.registry))
    generation = store.rollback(args.to)
    print(f"published generation {generation}: {store.read(generation).description}")


def cmd_keys(args: argparse.Namespace) -> None:
    from .auth import add_key, keys_path, read_keys, revoke_key

    path = keys_path(args.registry)
    if args.action == "add":
        record, key = add_key(path, args.tenant, args.admin)
        who = "admin" if record.admin else f"tenant {record.tenant}"
        print(f"key {record.id} for {who} stored (hashed) in {path}; it is shown only now:", file=sys.stderr)
        print(key)
    elif args.action == "list":
        for k in read_keys(path).keys:
            print(f"{k.id}  {'admin' if k.admin else 'tenant ' + str(k.tenant)}  {k.created_at}")
    else:
        if not args.id:
            raise ValueError("`muse keys revoke` needs the key id (see `muse keys list`)")
        record = revoke_key(path, args.id)
        print(f"revoked key {record.id}; servers stop accepting it within a second")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the registry's current deployment over HTTP (Granian)")
    p.add_argument("--registry", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="worker processes (each loads every model)")
    p.add_argument("--no-auth", action="store_true", help="accept requests without keys (local demos only)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULTS.max_body_bytes, help="larger requests get 413")
    p.add_argument("--backlog", type=int, default=2048)
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--score-log", help="score log directory (default: REGISTRY/scorelog)")
    p.add_argument(
        "--score-log-sample",
        type=float,
        default=DEFAULTS.score_log_sample,
        help="fraction of requests whose scores are logged (0 turns the log off)",
    )
    p.add_argument(
        "--score-log-max-mb",
        type=int,
        default=DEFAULTS.score_log_max_bytes >> 20,
        help="oldest files are deleted beyond this",
    )
    p.add_argument(
        "--score-log-flush-seconds",
        type=float,
        default=DEFAULTS.score_log_flush_seconds,
        help="the longest a logged score waits in memory before it is written",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("promote", help="publish a generation in which PREDICTOR is active on its intent's routes")
    p.add_argument("predictor")
    p.add_argument("--registry", required=True)
    p.add_argument("--tenant", action="append", help="only this tenant's route (repeatable; '*' = the default route)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="publish an earlier generation again")
    p.add_argument("--registry", required=True)
    p.add_argument("--to", type=int, help="generation to restore (default: the one before the current)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("deploy", help="validate, publish or show deployments")
    p.add_argument("action", choices=["validate", "apply", "show"])
    p.add_argument("file", nargs="?", type=pathlib.Path, help="deployment file (TOML or JSON)")
    p.add_argument("--registry", required=True)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("keys", help="manage API keys (stored hashed in REGISTRY/keys.toml)")
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("id", nargs="?", help="key id to revoke")
    p.add_argument("--registry", required=True)
    p.add_argument("--tenant", help="the tenant this key may score for")
    p.add_argument("--admin", action="store_true", help="a key for the admin API")
    p.set_defaults(func=cmd_keys)
