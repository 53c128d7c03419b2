"""Offline scoring benchmark: `muse score` on files of fraud-shaped rows (500 trees x 63
leaves, 100 features, LightGBM, calibrated), rows/s at 1 and 2 threads.

Parquet runs alternate 1 and 2 threads in one process (the host's load moves between runs),
and the speed-up is the median of each pair's ratio; each run's CPU seconds over its wall
seconds say how many cores it used (at 1 thread: one, Polars' threads included).  Beside
each, the native calls alone on the same rows held in memory (the same chunks, a thread
scoring whole chunks as `muse score`'s do, no reading or writing): what the threads could
give if the file cost nothing, and a gauge of how busy the host was.  One pair on the same
rows as CSV, and one on them rounded to float32 (scored as float32).  Then the file's own
work -- reading, converting, writing -- in CPU seconds at 1 thread with a scorer of zeros,
and the peak memory (VmHWM) of the `muse score` command, a process a run, on the file and on
one three times as long, at two chunk sizes: the peak must not grow with the file.  Scores
of every float64 run are checked equal.

    python -m muse.bench.offline_scoring [--rows 1000000] [--repeats 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl

from muse.bench.models import fraud_like_matrix, train_lightgbm
from muse.bench.timing import print_table
from muse.compile import Scores

MEMORY_CHUNKS = (65_536, 262_144)


def build(workdir: pathlib.Path, results: pathlib.Path) -> pathlib.Path:
    """The registry: the fraud model compiled (beta 0.1) and calibrated onto reference fraud."""
    from muse.calib import AlertRateCurve, ReferenceFile
    from muse.compile import build_artifact
    from muse.server.testing import build_registry, fit_calibration

    root = workdir / "registry"
    if (root / "calibrations" / "fraud").is_dir():
        return root
    curve = AlertRateCurve([0.2, 0.5, 0.6, 0.8], [0.70, 0.35, 0.10, 0.05])
    reg = build_registry(root, references=[ReferenceFile("fraud", curve)])
    model_file = train_lightgbm(results / "fraud_500x63.txt", trees=500, leaves=63)
    print("compiling the 500-tree model ...", file=sys.stderr, flush=True)
    build_artifact(model_file, reg.models_dir, name="fraud", version="1", beta=0.1)
    X, _ = fraud_like_matrix(20000, seed=3)
    fit_calibration(reg, "fraud/1", X, reference="fraud", name="fraud")
    return root


def features_file(workdir: pathlib.Path, rows: int, names: list[str]) -> tuple[pathlib.Path, np.ndarray]:
    X, _ = fraud_like_matrix(rows, seed=7)
    path = workdir / f"features-{rows}.parquet"
    if not path.exists():
        print(f"writing {rows:,} rows of features ...", file=sys.stderr, flush=True)
        frame = pl.DataFrame({"id": np.arange(rows), **{n: X[:, i] for i, n in enumerate(names)}})
        frame.write_parquet(path)
    return path, X


def native_only(score, X: np.ndarray, threads: int, spans: list[tuple[int, int]]) -> float:
    """rows/s of the native calls alone: X in memory (C order: a chunk's rows are a view), in
    score_file's chunks, each thread scoring whole chunks."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda span: score(X[span[0] : span[0] + span[1]]), spans))
    return len(X) / (time.perf_counter() - started)


# VmHWM, not getrusage's ru_maxrss: a child started by fork + exec inherits its parent's peak
# in ru_maxrss (here: the benchmark's own 1M-row matrix).
PEAK_RSS = """
import sys
from muse.server.cli import main
code = main(sys.argv[1:])
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")), file=sys.stderr)
sys.exit(code)
"""


def peak_rss(registry: pathlib.Path, inp: pathlib.Path, out: pathlib.Path, chunk_rows: int) -> float:
    """MiB: the peak resident memory of one `muse score` process (its own, not its probe's)."""
    cmd = [sys.executable, "-c", PEAK_RSS, "score", "--registry", str(registry), "--model", "fraud"]
    cmd += ["--calibration", "fraud", "--input", str(inp), "--output", str(out)]
    cmd += ["--threads", "2", "--chunk-rows", str(chunk_rows)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return int(proc.stderr.strip().splitlines()[-1]) / 1024


def imports_rss() -> float:
    """MiB: a process that has imported what `muse score` imports, and done nothing."""
    code = "import muse.server.cli, muse.core.file_scoring\n"
    code += 'print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))'
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) / 1024


def main(argv: list[str] | None = None) -> None:
    from muse.core.file_scoring import DEFAULT_CHUNK_ROWS, model_scorer, parquet_spans, plan_input, score_file
    from muse.core.registry import Registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5, help="pairs of Parquet runs (1 thread, 2 threads)")
    parser.add_argument("--chunk-rows", type=int, help="default: muse score's, by input kind")
    parser.add_argument("--workdir", type=pathlib.Path, help="keep the registry and the features files here")
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or pathlib.Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        registry = build(work, args.results)
        scorer = model_scorer(Registry(registry), "fraud", calibration="fraud")
        inp, X = features_file(work, args.rows, list(scorer.feature_names))
        csv = work / f"features-{args.rows}.csv"
        if not csv.exists():
            pl.scan_parquet(inp).sink_csv(csv)
        f32 = work / f"features-{args.rows}-float32.parquet"
        if not f32.exists():
            pl.scan_parquet(inp).with_columns(pl.exclude("id").cast(pl.Float32)).sink_parquet(f32)
        load = os.getloadavg()
        kinds = ("parquet", "native", "csv", "float32")
        runs: dict[str, dict[int, list[float]]] = {k: {1: [], 2: []} for k in kinds}
        cores: dict[str, dict[int, list[float]]] = {k: {1: [], 2: []} for k in kinds}
        outputs = {}

        def run(kind: str, path: pathlib.Path, threads: int) -> None:
            out = work / f"scores-{kind}-{threads}.parquet"
            plan = plan_input(path, scorer.feature_names)
            cpu = time.process_time()
            summary = score_file(scorer, plan, out, threads=threads, chunk_rows=args.chunk_rows)
            runs[kind][threads].append(summary.rows_per_second)
            cores[kind][threads].append((time.process_time() - cpu) / summary.seconds)
            outputs[(kind, threads)] = out
            print(
                f"{kind}, {threads} thread(s): {summary.rows_per_second:,.0f} rows/s, "
                f"{cores[kind][threads][-1]:.2f} cores",
                file=sys.stderr,
                flush=True,
            )

        chunk = args.chunk_rows or DEFAULT_CHUNK_ROWS["Parquet"]
        spans = {t: parquet_spans(plan_input(inp, scorer.feature_names), chunk, t) for t in (1, 2)}
        for _ in range(args.repeats):
            for threads in (1, 2):
                run("parquet", inp, threads)
                cpu, wall = time.process_time(), time.perf_counter()
                runs["native"][threads].append(native_only(scorer.score, X, threads, spans[threads]))
                cores["native"][threads].append((time.process_time() - cpu) / (time.perf_counter() - wall))
                print(f"native, {threads} thread(s): {runs['native'][threads][-1]:,.0f} rows/s", file=sys.stderr)
        for threads in (1, 2):
            run("csv", csv, threads)
        for threads in (1, 2):
            run("float32", f32, threads)
        # The file's own work -- reading, the row-major matrix, writing -- in CPU seconds, with a
        # scorer that returns zeros, at 1 thread: a thread does it between its native calls.
        noop = dataclasses.replace(scorer, score=lambda Z: Scores(np.zeros((3, len(Z)))))
        pipeline = {}
        for kind, path in (("parquet", inp), ("csv", csv), ("float32", f32)):
            cpu = time.process_time()
            summary = score_file(noop, plan_input(path, scorer.feature_names), work / "noop.parquet", threads=1)
            pipeline[kind] = (time.process_time() - cpu, summary.seconds)
        first = pl.read_parquet(outputs[("parquet", 1)])
        for key, out in outputs.items():
            if key[0] != "float32" and not pl.read_parquet(out).equals(first):
                raise SystemExit(f"{key}: scores differ from Parquet's with 1 thread")
        if not pl.read_parquet(outputs[("float32", 1)]).equals(pl.read_parquet(outputs[("float32", 2)])):
            raise SystemExit("float32: scores differ between 1 and 2 threads")
        memory = {}
        baseline = imports_rss()
        if not args.no_memory:
            # Three times the rows: the peak must not grow with the file.
            triple = work / f"features-{3 * args.rows}.parquet"
            if not triple.exists():
                pl.concat([pl.scan_parquet(inp)] * 3).sink_parquet(triple)
            triple_csv = triple.with_suffix(".csv")
            if not triple_csv.exists():
                pl.concat([pl.scan_parquet(inp)] * 3).sink_csv(triple_csv)
            csv_chunk = args.chunk_rows or DEFAULT_CHUNK_ROWS["CSV"]
            cases = [(inp, args.rows, c) for c in MEMORY_CHUNKS] + [(triple, 3 * args.rows, c) for c in MEMORY_CHUNKS]
            cases += [(csv, args.rows, csv_chunk), (triple_csv, 3 * args.rows, csv_chunk)]
            for path, n, chunk in cases:
                kind = "CSV" if path.suffix == ".csv" else "Parquet"
                print(f"peak memory, {kind}, {n:,} rows, --chunk-rows {chunk:,} ...", file=sys.stderr, flush=True)
                memory[(kind, n, chunk)] = peak_rss(registry, path, work / "scores-rss.parquet", chunk)
        sizes = {"Parquet": inp.stat().st_size / 2**20, "CSV": csv.stat().st_size / 2**20}  # before the files go
    chunks = {k: args.chunk_rows or v for k, v in DEFAULT_CHUNK_ROWS.items()}
    result = {"rows": args.rows, "chunk_rows": chunks, "load_before": load, "runs": runs, "cores": cores}
    result["peak_rss_mib"] = [{"input": k, "rows": n, "chunk_rows": c, "mib": m} for (k, n, c), m in memory.items()]
    result["imports_rss_mib"] = baseline
    result["pipeline_cpu_seconds"] = pipeline
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "offline_scoring.json").write_text(json.dumps(result, indent=1))

    print()
    print(
        f"{args.rows:,} rows x 100 features (Parquet {sizes['Parquet']:,.0f} MiB, "
        f"CSV {sizes['CSV']:,.0f} MiB), fraud 500x63 calibrated, chunks of up to {chunks['Parquet']:,} rows "
        f"(Parquet: {len(spans[1])} / {len(spans[2])} chunks of whole row groups at 1 / 2 threads), "
        f"{chunks['CSV']:,} (CSV); "
        f"Parquet and native: {args.repeats} pairs alternated, CSV and float32: one pair; "
        f"load average before {load[0]:.2f}"
    )
    table = []
    labels = {
        "parquet": "muse score, Parquet file",
        "float32": "muse score, Parquet file as float32",
        "csv": "muse score, CSV file",
        "native": "native calls only, rows in memory",
    }
    for kind, label in labels.items():
        one, two = runs[kind][1], runs[kind][2]
        ratios = [b / a for a, b in zip(one, two)]
        table.append(
            [
                label,
                f"{statistics.median(one):,.0f}",
                f"{statistics.median(two):,.0f}",
                f"{statistics.median(ratios):.2f}x",
                ", ".join(f"{x:.2f}" for x in ratios),
                f"{statistics.median(cores[kind][1]):.2f} / {statistics.median(cores[kind][2]):.2f}",
            ]
        )
    headers = ["what", "1 thread rows/s", "2 threads rows/s", "speed-up (median)", "each pair", "cores used (1 / 2)"]
    print_table(headers, table)
    scoring = args.rows / statistics.median(runs["native"][1])  # seconds of one core
    for kind, label in (("parquet", "Parquet"), ("float32", "Parquet as float32"), ("csv", "CSV")):
        cpu, wall = pipeline[kind]
        print(
            f"{label}: reading, converting and writing take {cpu:.2f} CPU s ({wall:.2f} s) at 1 thread with a "
            f"scorer of zeros, beside {scoring:.1f} s of scoring"
            + (" (CSV: parsed on Polars' threads, beside the scoring threads)" if kind == "csv" else "")
        )
    if memory:
        print()
        rows = []
        for (kind, n, chunk), mib in memory.items():
            bound = 2 * 2 * chunk * 100 * 8 / 2**20
            rows.append([kind, f"{n:,}", f"{chunk:,}", f"{bound:,.0f}", f"{mib:,.0f}", f"{mib - baseline:,.0f}"])
        print(f"muse score --threads 2, a process a run; a process that only imports its modules: {baseline:,.0f} MiB")
        headers = ["input", "rows", "--chunk-rows", "2 threads x 2 x chunk x 100 x 8 B, MiB", "peak RSS, MiB"]
        headers.append("above imports, MiB")
        print_table(headers, rows)


if __name__ == "__main__":
    main()
