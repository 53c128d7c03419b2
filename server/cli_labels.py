"""`muse labels import`: which scored events were fraud, stored under REGISTRY/labels/."""

from __future__ import annotations

import argparse
import pathlib
import sys

from muse.calib.names import MAX_EVENT_ID_CHARS
from muse.core.labels import MAX_FILE_BYTES, MAX_ROWS, LabelStore, import_labels

from .cli_args import add_registry


def register(sub) -> None:
    labels = sub.add_parser("labels", help="import labels (which scored events were fraud) into the registry")
    lsub = labels.add_subparsers(dest="labels_command", required=True)
    imp = lsub.add_parser(
        "import",
        help="store a Parquet or CSV file of labels (event_id, label 0/1, optional label_time and tenant)",
        description="Store labels under REGISTRY/labels/ as a new, append-only import: the last label of an event "
        "wins (a later import over an earlier one; within a file, a later row). Event ids are the ids the scoring "
        f"requests carried, compared as text (whole numbers are converted), at most {MAX_EVENT_ID_CHARS} characters, "
        "printable. label is 0 or 1 (or true/false); label_time is ISO 8601 (UTC when it has no offset); tenant, "
        "when given, limits the label to that tenant's event of the id (tenants' ids may collide). Refused "
        "rows are listed with their line (CSV) or row (Parquet) and the rest are stored. At most "
        f"{MAX_FILE_BYTES >> 20} MiB and {MAX_ROWS:,} rows an import. Exit status: 0 when rows were stored, "
        "1 when every row was refused (nothing is stored), 2 when the file cannot be used.",
    )
    imp.add_argument(
        "file", type=pathlib.Path, help="a .parquet or .csv file with columns event_id, label[, label_time, tenant]"
    )
    add_registry(imp)
    imp.set_defaults(func=cmd_import)


def _rows(n: int) -> str:
    return f"{n:,} row" if n == 1 else f"{n:,} rows"


def _events(n: int) -> str:
    return f"{n:,} event" if n == 1 else f"{n:,} events"


def cmd_import(args: argparse.Namespace) -> int:
    registry = pathlib.Path(args.registry)
    if not registry.is_dir():
        # a mistyped path would otherwise start a new registry holding nothing but labels
        raise ValueError(f"--registry {registry}: no such directory; give the registry the server and `muse calib` use")
    store = LabelStore(registry)
    result = import_labels(store, args.file)
    read = result.read
    print(f"read {_rows(read.rows)} from {args.file} ({read.kind})")
    if read.refused_count:
        print(f"refused {_rows(read.refused_count)}:", file=sys.stderr)
        for where, reason in read.refused:
            print(f"  {where}: {reason}", file=sys.stderr)
        if read.refused_count > len(read.refused):
            print(f"  and {read.refused_count - len(read.refused):,} more", file=sys.stderr)
    if result.path is None:
        print(
            f"stored nothing: {'every row was refused' if read.rows else 'the file holds no rows'}; "
            "fix the rows above and import the file again",
            file=sys.stderr,
        )
        return 1
    stored = read.valid.height
    repeats = stored - result.events
    repeated = f" ({_rows(repeats)} repeat an event of this file: its last row wins)" if repeats else ""
    print(f"stored {_rows(stored)}, {_events(result.events)}{repeated} -> {result.path}")
    if read.refused_count:
        print(f"refused {_rows(read.refused_count)} (listed above); the others are stored")
    print(f"relabelled {_events(result.relabelled)} that had a label already ({result.changed:,} changed)")
    return 0
