"""The `muse` command line.  Each subcommand is a thin shell over a library
call; errors print one line that names the file and the fix, and exit 2."""

from __future__ import annotations

import argparse
import pathlib
import sys

from muse.calib.samples import is_url
from muse.compile import ArtifactError, ModelFormatError
from muse.core.objectstore import StoreError
from muse.core.registry import RegistryError
from muse.core.remote import CURRENT, Mirror
from muse.server.cli_args import add_registry


class CliError(Exception):
    """A user mistake: printed without a traceback."""


def _progress(label: str):
    def report(done: int, total: int) -> None:
        if sys.stderr.isatty():
            end = "\n" if done == total else "\r"
            print(f"{label}: {done}/{total}", end=end, file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 4) == 0:
            print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)

    return report


def cmd_compile(args: argparse.Namespace) -> None:
    from muse.compile import build_artifact, load_artifact

    target = build_artifact(
        args.model_file,
        pathlib.Path(args.registry) / "models",
        name=args.name,
        version=args.version,
        beta=args.beta,
        fmt=args.format,
        jobs=args.jobs,
        progress=_progress("compiling translation units"),
    )
    model = load_artifact(target)  # proves the artifact loads before we report success
    m = model.manifest
    print(f"compiled {args.model_file} -> {target}")
    print(
        f"  {m.num_tree} trees, {m.num_feature} features, format {m.format}, beta {m.beta}, {m.compile_seconds:.1f} s"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muse", description="Multi-tenant score serving for tree ensembles")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile a model file into a native artifact in the registry")
    p.add_argument("model_file", type=pathlib.Path)
    add_registry(p)  # the artifact goes to REGISTRY/models/NAME/VERSION
    p.add_argument("--name", required=True)
    p.add_argument("--version", help="default: one more than the highest numeric version present")
    p.add_argument(
        "--beta",
        type=float,
        default=1.0,
        help="negative keep-rate used at training, in (0, 1]; default 1 (no undersampling, no correction). "
        "Stored in the manifest: serving corrects the model's scores with it, and so does `muse calib fit`",
    )
    p.add_argument("--format", default="auto", choices=["auto", "lightgbm", "xgboost", "sklearn"])
    p.add_argument("--jobs", type=int, help="parallel compiler processes (default: all cores)")
    p.set_defaults(func=cmd_compile)

    from muse.server import cli_calib, cli_edge, cli_labels, cli_refresh, cli_score, cli_serve, cli_usage, demo

    cli_calib.register(sub)
    cli_edge.register(sub)
    cli_labels.register(sub)
    cli_refresh.register(sub)
    cli_score.register(sub)
    cli_serve.register(sub)
    cli_usage.register(sub)
    demo.register(sub)
    return parser


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C


# What a command does with a registry at a URL (its parser's ``remote`` default; "write" unless
# it says otherwise): "write" pulls before and pushes what it wrote after; "read" only pulls;
# "follow" (a process that follows the store as it runs) starts from its mirror when the store
# cannot be reached, and pushes nothing.


def _mirror(args: argparse.Namespace) -> Mirror | None:
    """For --registry at a URL: its local mirror, brought up to date, which the command then
    uses as its registry (core/remote.py); None for a local registry."""
    location = getattr(args, "registry", None)
    if not location or not is_url(location):
        return None
    mirror = Mirror.open(location)
    try:
        mirror.pull()
    except StoreError as exc:
        # a replica restarted during an outage serves what its mirror holds, and follows once it can
        if getattr(args, "remote", "write") != "follow" or not (mirror.root / CURRENT).exists():
            raise
        print(
            f"muse {args.command}: warning: {exc}; serving the mirror's generation until the store answers",
            file=sys.stderr,
        )
    args.registry = str(mirror.root)
    return mirror


def main(argv: list[str] | None = None) -> int:
    command = "muse"
    try:
        args = build_parser().parse_args(argv)
        command = f"muse {args.command}"
        mirror = _mirror(args)
        code = args.func(args)
        if mirror is not None and getattr(args, "remote", "write") == "write":
            mirror.push()  # what the command wrote: a compiled model, a calibration, keys, labels...
    except (CliError, ModelFormatError, ArtifactError, RegistryError, FileExistsError, ValueError, OSError) as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: what the command was doing cleans up as the exception unwinds (muse compile's
        # staging folder, a probe process); the user sees one line, not a traceback.
        start = "\n" if sys.stderr.isatty() else ""  # off the line a progress report or ^C left open
        print(f"{start}{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
