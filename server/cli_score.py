"""`muse score`: score a Parquet or CSV file offline, through the compiled code and the
calibration the server uses, a thread a core (muse.core.file_scoring)."""

from __future__ import annotations

import argparse
import sys
import time

from muse.core.file_scoring import (
    DEFAULT_CHUNK_ROWS,
    count_rows,
    default_threads,
    model_scorer,
    plan_input,
    predictor_scorer,
    score_file,
)
from muse.core.registry import Registry

from .cli_args import add_registry

PROGRESS_EVERY = 0.25  # seconds between progress lines on a terminal


def register(sub) -> None:
    p = sub.add_parser(
        "score",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="score a Parquet or CSV file of features into a Parquet file of scores, on every core",
        description=(
            "Score every row of --input with a deployed predictor (--predictor) or a model and\n"
            "optionally its calibration (--model, --calibration): the same compiled library and map\n"
            "the server uses, so the scores equal the server's.  Output columns, rows in the input's\n"
            "order: the id column (when the input has one), margin, corrected, mapped, predictor,\n"
            "version.\n\n"
            "Features are matched by the model's feature names when the input has all of them (other\n"
            "columns are ignored), else by position (then the input must have exactly as many columns\n"
            "as features, besides the id column).  Missing values: null, empty or NaN.\n\n"
            "Each of --threads threads reads, converts and scores a chunk of --chunk-rows rows at a\n"
            "time (Parquet: whole row groups), so the command uses --threads cores (CSV: Polars\n"
            "parses it on threads of its own besides).  The output is written chunk by chunk, in the\n"
            "input's order, so memory does not grow with the file: for Parquet about 2 x threads x\n"
            "chunk rows x features x 8 bytes plus Polars' buffers (~1 GiB at the default with 100\n"
            "features and 2 threads; ~0.6 GiB at --chunk-rows 65536, slower when that cuts row\n"
            "groups); for CSV what Polars' streaming reader reads ahead (~0.9 GiB at the default)."
        ),
    )
    add_registry(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--predictor", metavar="NAME", help="a predictor of the current deployment (ensembles too)")
    which.add_argument("--model", metavar="NAME[/VERSION]", help="a compiled model (default version: the latest)")
    p.add_argument("--calibration", metavar="NAME[/VERSION]", help="with --model: map scores through this calibration")
    p.add_argument(
        "--tenant",
        help="use this tenant's map (default: the all-traffic map; also when the tenant has none of its own)",
    )
    p.add_argument("--input", required=True, metavar="FILE", help="features: a .parquet or .csv file")
    p.add_argument("--output", required=True, metavar="FILE", help="scores: a .parquet file (replaced if present)")
    p.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="threads, each reading and scoring whole chunks: the cores used (default: every core, %(default)s)",
    )
    p.add_argument(
        "--chunk-rows",
        type=int,
        metavar="N",
        help=f"rows a thread reads and scores at a time (default: {DEFAULT_CHUNK_ROWS['Parquet']:,} for Parquet, "
        f"fewer past 4 threads; {DEFAULT_CHUNK_ROWS['CSV']:,} for CSV)",
    )
    p.add_argument("--id-column", metavar="NAME", help="column copied to the output (default: `id`, when present)")
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> None:
    if args.calibration is not None and args.predictor is not None:
        raise ValueError("--calibration goes with --model; a --predictor brings its own calibration")
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}: give 1 or more")
    if args.chunk_rows is not None and args.chunk_rows < 1:
        raise ValueError(f"--chunk-rows {args.chunk_rows}: give 1 or more")
    reg = Registry(args.registry)
    if args.predictor is not None:
        scorer = predictor_scorer(reg, args.predictor, tenant=args.tenant)
    else:
        scorer = model_scorer(reg, args.model, calibration=args.calibration, tenant=args.tenant)
    plan = plan_input(args.input, scorer.feature_names, id_column=args.id_column)
    progress = None
    if sys.stderr.isatty():
        progress = _progress(count_rows(plan))
    summary = score_file(scorer, plan, args.output, threads=args.threads, chunk_rows=args.chunk_rows, progress=progress)
    matched = "by name" if plan.by_name else "by position"
    kept = f", id column {plan.id_column!r}" if plan.id_column else ""
    print(
        f"scored {summary.rows:,} rows of {plan.path} -> {args.output} in {summary.seconds:.1f} s "
        f"({summary.rows_per_second:,.0f} rows/s, {summary.threads} threads, {summary.chunks} chunks); "
        f"{scorer.description}; features {matched}{kept}"
    )


def _progress(total: int):
    last = [0.0]

    def report(done: int, seconds: float) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < PROGRESS_EVERY:
            return
        last[0] = now
        rate = done / seconds if seconds > 0 else 0.0
        share = f" ({100 * done / total:.0f}%)" if total else ""
        end = "\n" if done >= total else "\r"
        print(f"scoring: {done:,}/{total:,} rows{share}, {rate:,.0f} rows/s", end=end, file=sys.stderr, flush=True)

    return report
