"""`muse serve`, `muse deploy` and `muse keys`."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import resource
import shutil
import sys
import tempfile

import msgspec

from muse.core.deploy import DeploymentStore
from muse.core.registry import Registry
from muse.core.spec import SpecError, encode_spec

from .cli_args import add_registry
from .logs import FORMATS
from .replica import ReplicaSync, replica_id
from .settings import DEFAULTS, SUPERVISOR_ENV, Settings, to_environment

log = logging.getLogger("muse.serve")
FILES_RESERVED = 512  # descriptors a worker keeps for libraries, the score log and the registry


def cmd_serve(args: argparse.Namespace) -> None:
    registry = pathlib.Path(args.registry).resolve()
    if not registry.is_dir():
        raise SpecError(f"{registry}: no such registry directory; create one with `muse compile --registry {registry}`")
    mirror = Registry(registry).mirror  # the registry is on object storage (core/remote.py)
    replica = replica_id(args.replica_id) if mirror is not None else None
    score_log = None
    if args.score_log_sample > 0:
        # a replica's own spool: its files are uploaded under scorelog/replica=ID/ and deleted here
        default = registry / "scorelog" / f"replica={replica}" if replica else registry / "scorelog"
        score_log = str(pathlib.Path(args.score_log or default).resolve())
    try:
        settings = msgspec.convert(
            dict(
                registry=str(registry),
                workers=args.workers,
                auth=not args.no_auth,
                metrics_auth=args.metrics_auth,
                tenant_labels=not args.no_tenant_labels,
                max_body_bytes=args.max_body_bytes,
                max_json_bytes=args.max_json_bytes,
                body_timeout=args.body_timeout,
                access_log=args.access_log,
                score_log=score_log,
                score_log_sample=args.score_log_sample,
                score_log_max_bytes=args.score_log_max_mb << 20,
                score_log_flush_seconds=args.score_log_flush_seconds,
            ),
            Settings,
        )
    except msgspec.ValidationError as exc:
        raise ValueError(f"{flag_named(str(exc))}; see `muse serve --help`") from None
    if args.header_timeout <= 0 or args.max_connections < 1:
        raise ValueError("--header-timeout must be > 0 and --max-connections >= 1; see `muse serve --help`")
    to_environment(settings)
    os.environ[SUPERVISOR_ENV] = str(os.getpid())  # workers stop if this process dies (server/app.py)
    # Polars (the score log) would start a thread per core in every worker and compete with the
    # request path for the CPU; one background thread per worker is plenty.
    os.environ.setdefault("POLARS_MAX_THREADS", "1")
    # Every worker, and this process (worker restarts), write their metrics here; /metrics merges
    # them.  prometheus_client reads this when imported, which the CLI already did: the workers
    # (metrics.py) and supervisor.py choose their value class again.
    metrics_dir = tempfile.mkdtemp(prefix="muse-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    sync = None
    if mirror is not None and replica is not None:
        sync = ReplicaSync(mirror, settings.poll_interval, pathlib.Path(score_log) if score_log else None, replica)
        sync.start()
    try:
        _serve(args, settings, registry)
    finally:
        if sync is not None:
            sync.stop()  # the workers have exited: their last score-log files go up now
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(args: argparse.Namespace, settings: Settings, registry: pathlib.Path) -> None:
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings

    from . import logs
    from .api_health import AUTH_OFF
    from .auth import keys_path, read_keys
    from .supervisor import SupervisedGranian

    logs.configure(args.log_format)
    keys = read_keys(keys_path(registry)).keys
    if not settings.auth:
        log.warning(
            "%s; the admin API answers admin keys only (%d configured)",
            AUTH_OFF,
            sum(k.admin for k in keys),
            extra={"event": "auth_off"},
        )
    elif not keys:
        log.warning(
            "%s holds no keys, so every scoring request will get 401; add one with `muse keys add --tenant T` "
            "or pass --no-auth",
            keys_path(registry),
        )
    generation = DeploymentStore(Registry(registry)).current_generation()
    if generation is None:
        log.warning(
            "nothing is deployed yet; the server stays not-ready until `muse deploy apply` publishes a deployment"
        )
    connections = _connection_cap(args.max_connections)
    log.info(
        "muse serve on http://%s:%d, %d workers, auth %s, registry %s, generation %s",
        args.host,
        args.port,
        args.workers,
        "on" if settings.auth else "OFF",
        registry,
        generation,
        extra={
            "event": "start",
            "listen": f"{args.host}:{args.port}",
            "workers": args.workers,
            "auth": settings.auth,
            "metrics_auth": settings.metrics_auth,
            "tenant_labels": settings.tenant_labels,
            "registry": str(registry),
            "generation": generation,
            "score_log": settings.score_log,
            "max_connections": connections,
            "header_timeout": args.header_timeout,
            "body_timeout": settings.body_timeout,
        },
    )
    SupervisedGranian(
        "muse.server.app:create_app",
        factory=True,
        interface=Interfaces.ASGI,
        loop=Loops.uvloop,
        address=args.host,
        port=args.port,
        workers=args.workers,
        backlog=args.backlog,
        # HTTP/1.1 only: with protocol detection (auto), Granian applies no header timeout, and
        # a connection that never sends a byte is held for ever.
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(header_read_timeout=int(args.header_timeout * 1000)),
        # Granian holds one permit of this per open connection, idle or not.
        backpressure=connections,
        log_dictconfig=logs.config(args.log_format),
        log_access=False,  # the app's own access log names the tenant and key (--access-log)
        websockets=False,
    ).serve()


# Settings fields as the flags that set them say them (a validation error names the field).
FLAGS = {
    "$.workers": "--workers",
    "$.max_body_bytes": "--max-body-bytes",
    "$.max_json_bytes": "--max-json-bytes",
    "$.body_timeout": "--body-timeout",
    "$.score_log_sample": "--score-log-sample",
    "$.score_log_max_bytes": "--score-log-max-mb (in MiB)",
    "$.score_log_flush_seconds": "--score-log-flush-seconds",
}


def flag_named(message: str) -> str:
    for field, flag in FLAGS.items():
        message = message.replace(f"`{field}`", flag)
    return message.replace(">= 1048576", ">= 1 MiB")


def _connection_cap(wanted: int) -> int:
    """Connections a worker may hold open: ``wanted``, within what the process may open.  The
    soft file limit is raised to the hard one first (idle connections cost little here: a
    socket and a small buffer in Granian's Rust side, no Python until headers arrive)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # e.g. an unlimited hard limit the kernel caps lower
            pass
    usable = max(64, soft - FILES_RESERVED)
    if wanted > usable:
        log.warning(
            "--max-connections %d is more than this process may open (file limit %d); using %d",
            wanted,
            soft,
            usable,
        )
    return min(wanted, usable)


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
        record, key = add_key(path, args.tenant, args.admin, args.metrics)
        who = "admin" if record.admin else "metrics" if record.metrics else f"tenant {record.tenant}"
        print(f"key {record.id} for {who} stored (hashed) in {path}; it is shown only now:", file=sys.stderr)
        print(key)
    elif args.action == "list":
        for k in read_keys(path).keys:
            role = "admin" if k.admin else "metrics" if k.metrics else f"tenant {k.tenant}"
            print(f"{k.id}  {role}  {k.created_at}")
    else:
        if not args.id:
            raise ValueError("`muse keys revoke` needs the key id (see `muse keys list`)")
        record = revoke_key(path, args.id)
        print(f"revoked key {record.id}; servers stop accepting it within a second")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the registry's current deployment over HTTP (Granian)")
    add_registry(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="worker processes (each loads every model)")
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="score without keys (local demos only); the admin API still needs an admin key",
    )
    p.add_argument("--metrics-auth", action="store_true", help="/metrics needs an admin or metrics key")
    p.add_argument("--no-tenant-labels", action="store_true", help="metrics carry no tenant names")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULTS.max_body_bytes, help="larger requests get 413")
    p.add_argument(
        "--max-json-bytes",
        type=int,
        default=DEFAULTS.max_json_bytes,
        help="larger JSON bodies get 413 (decoding holds the event loop); binary tensors may be larger",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=10_000,
        help="open connections per worker; more wait in the listen backlog",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=5.0,
        help="seconds a connection may wait before sending a request's headers (idle keep-alive included)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULTS.body_timeout,
        help="seconds for a request's body to arrive; slower ones get 408",
    )
    p.add_argument("--backlog", type=int, default=2048, help="connections waiting to be accepted")
    p.add_argument("--access-log", action="store_true", help="a log line per request (tenant, key id, status, time)")
    p.add_argument("--log-format", choices=FORMATS, default="json", help="json: one object a line")
    p.add_argument(
        "--score-log",
        help="score log directory (default: REGISTRY/scorelog; for a registry on object storage a spool "
        "in its mirror, uploaded to REGISTRY/scorelog/replica=ID/)",
    )
    p.add_argument(
        "--replica-id",
        help="this replica's name in the uploaded score log (registry on object storage only; default: "
        "$MUSE_REPLICA_ID, else the host name)",
    )
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
    p.set_defaults(func=cmd_serve, remote="follow")  # a server publishes as it goes

    p = sub.add_parser("promote", help="publish a generation in which PREDICTOR is active on its intent's routes")
    p.add_argument("predictor")
    add_registry(p)
    p.add_argument("--tenant", action="append", help="only this tenant's route (repeatable; '*' = the default route)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="publish an earlier generation again")
    add_registry(p)
    p.add_argument("--to", type=int, help="generation to restore (default: the one before the current)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("deploy", help="validate, publish or show deployments")
    p.add_argument("action", choices=["validate", "apply", "show"])
    p.add_argument("file", nargs="?", type=pathlib.Path, help="deployment file (TOML or JSON)")
    add_registry(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("keys", help="manage API keys (stored hashed in REGISTRY/keys.toml)")
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("id", nargs="?", help="key id to revoke")
    add_registry(p)
    p.add_argument("--tenant", help="the tenant this key may score for")
    p.add_argument("--admin", action="store_true", help="a key for the admin API")
    p.add_argument("--metrics", action="store_true", help="a key that may read /metrics (see serve --metrics-auth)")
    p.set_defaults(func=cmd_keys)
