"""`muse edge render` and `muse edge sync`: HAProxy in front of `muse serve`, refusing a tenant's
excess requests from the deployment's quotas.  The work is muse.server.edge; this is its
command line."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from muse.core.registry import Registry
from muse.core.spec import parse_duration

from . import edge, logs
from .cli_args import add_registry
from .logs import FORMATS

log = logging.getLogger("muse.edge")


def _window(text: str) -> int:
    return int(parse_duration("--window", text).total_seconds())


def cmd_render(args: argparse.Namespace) -> None:
    config = edge.render(
        args.registry, args.out, args.backend, args.bind, _window(args.window), args.unknown_per_second, args.socket
    )
    settings = edge.read_settings(args.out)
    binary = edge.find_haproxy()
    if binary is not None:
        edge.check_config(config, binary)
    checked = f"checked with {binary} -c" if binary else "not checked: haproxy is not installed here"
    print(f"wrote {config} and its maps ({checked})")
    print(f"  start:  haproxy -f {config}")
    print(f"  follow: muse edge sync --registry {args.registry} --out {args.out}   # runtime API {settings.socket}")


def cmd_sync(args: argparse.Namespace) -> None:
    logs.configure(args.log_format)
    sync = edge.EdgeSync(Registry(args.registry), args.out, args.socket)
    if args.once:
        sync.sync()
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("edge sync: %s -> HAProxy at %s, every %g s", args.registry, sync.settings.socket, edge.POLL_SECONDS)
    sync.run(stop)
    log.info("edge sync stopped")


def register(sub) -> None:
    p = sub.add_parser("edge", help="HAProxy in front of `muse serve`: refuse a tenant's excess requests early")
    esub = p.add_subparsers(dest="edge_command", required=True)

    r = esub.add_parser(
        "render",
        help="write haproxy.cfg and its maps from the deployment's quotas and the registry's keys",
        description="Write DIR/haproxy.cfg, DIR/keys.map, DIR/limits.map and DIR/edge.json. A tenant's requests "
        "admitted in the last WINDOW are held to ceil(max(rows_per_second * WINDOW, burst_rows)): the "
        "server's token bucket at one row a request, as a sliding window holds it. Refusals are 429 with "
        "Retry-After, answered by HAProxy.",
    )
    add_registry(r)
    r.add_argument("--backend", action="append", required=True, metavar="HOST:PORT", help="a `muse serve` (repeatable)")
    r.add_argument("--bind", required=True, metavar="HOST:PORT", help="where HAProxy listens")
    r.add_argument("--out", required=True, help="the directory for the configuration and its maps")
    r.add_argument(
        "--window",
        default=f"{edge.DEFAULT_WINDOW}s",
        help=f"the window requests are counted over (e.g. 2s, 10s; default {edge.DEFAULT_WINDOW}s)",
    )
    r.add_argument(
        "--unknown-per-second",
        type=float,
        default=edge.DEFAULT_UNKNOWN_PER_SECOND,
        help="requests per second let through with an unknown key or none, all together (the server answers 401)",
    )
    r.add_argument("--socket", help="HAProxy's runtime API socket, for `sync` (default: OUT/haproxy.sock)")
    r.set_defaults(func=cmd_render, remote="read")

    s = esub.add_parser(
        "sync",
        help="keep a running HAProxy's maps those of the registry's current deployment and keys",
        description="Poll the registry (every 0.25 s) and, when a deployment is published or keys.toml changes, "
        "rewrite OUT's maps and replace them in HAProxy through its runtime API (each map atomically).",
    )
    add_registry(s)
    s.add_argument("--out", required=True, help="the directory `muse edge render` wrote")
    s.add_argument("--socket", help="HAProxy's runtime API socket (default: the one rendered, in OUT/edge.json)")
    s.add_argument("--once", action="store_true", help="apply once and exit")
    s.add_argument("--log-format", choices=FORMATS, default="json", help="json: one object a line")
    s.set_defaults(func=cmd_sync, remote="follow")
