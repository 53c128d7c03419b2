"""Object-store clients for the registry, obstore (Rust object_store) and s3fs (fsspec, aiobotocore), in one
process against moto's S3 server on loopback (HTTP/1.1 keep-alive); the clients alternate round by round.
Per client: wall time and the process's CPU (all threads) per call, medians over rounds, of the poll (a GET
of an unchanged 10-byte object with If-None-Match, answered 304, as a replica sends every 0.25 s; and
HEAD + ETag compare) and of GETs of 10 KiB and 5 MiB; whether create-if-absent (If-None-Match: * on PUT)
and compare-and-swap (If-Match on PUT) work, tried against moto; import time and installed size beyond
the project's dependencies. s3fs is no project dependency (its aiobotocore pins botocore below what moto's
boto3 requires), so install it aside; without it the table has obstore alone:

    .venv/bin/pip install --target build/s3fs-site s3fs
    PYTHONPATH=build/s3fs-site taskset -c 1 .venv/bin/python -m muse.bench.object_store [--rounds 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import obstore
from obstore.exceptions import AlreadyExistsError, NotModifiedError, PreconditionError
from obstore.store import S3Store
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from muse.bench.timing import print_table
from muse.server import testing

BUCKET = "muse-bench"
PREFIX = "registry"
SIZES = {"poll": 10, "10 KiB": 10 << 10, "5 MiB": 5 << 20}
Client = dict[str, Callable[[], object]]


def start_moto() -> testing.S3Server:
    """moto's S3 server, answering HTTP/1.1, on the cores the benchmark is not pinned to."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # moto keeps the venv's botocore
    moto = testing.S3Server(None, keep_alive=True, environ=env)
    others = set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)
    if others:  # the benchmark is pinned (taskset): the server runs on the other cores
        os.sched_setaffinity(moto.proc.pid, others)
    return moto


def obstore_client(etag: str) -> tuple[Client, dict[str, str]]:
    store = S3Store(BUCKET, prefix=PREFIX, client_options={"allow_http": True})

    def poll() -> None:
        try:
            obstore.get(store, "poll", options={"if_none_match": etag})
        except NotModifiedError:
            return
        raise AssertionError("the polled object changed")

    ops: Client = {
        "poll: conditional GET, 304": poll,
        "poll: HEAD, compare ETag": lambda: obstore.head(store, "poll")["e_tag"] == etag,
        "GET 10 KiB": lambda: obstore.get(store, "10 KiB").bytes(),
        "GET 5 MiB": lambda: obstore.get(store, "5 MiB").bytes(),
    }
    verdict = {}
    obstore.put(store, "cas-o", b"1", mode="create")
    try:
        obstore.put(store, "cas-o", b"2", mode="create")
        verdict["create-if-absent"] = "no: a second create succeeded"
    except AlreadyExistsError:
        verdict["create-if-absent"] = 'yes: put(mode="create") -> AlreadyExistsError'
    good = obstore.head(store, "cas-o")["e_tag"] or ""
    try:
        obstore.put(store, "cas-o", b"3", mode={"e_tag": '"0"'})
        verdict["compare-and-swap"] = "no: a wrong ETag was accepted"
    except PreconditionError:
        obstore.put(store, "cas-o", b"3", mode={"e_tag": good})
        verdict["compare-and-swap"] = 'yes: put(mode={"e_tag": etag}) -> PreconditionError'
    return ops, verdict


def s3fs_client(etag: str) -> tuple[Client, dict[str, str]]:
    fs = importlib.import_module("s3fs").S3FileSystem()
    base = f"{BUCKET}/{PREFIX}"

    def poll() -> None:
        # No public conditional GET: call_s3 passes IfNoneMatch to aiobotocore's get_object; the 304 comes
        # back as botocore's ClientError, which s3fs turns into OSError(EIO).
        try:
            fs.call_s3("get_object", Bucket=BUCKET, Key=f"{PREFIX}/poll", IfNoneMatch=etag)
        except OSError as e:
            if "(304)" in str(e):
                return
            raise
        raise AssertionError("the polled object changed")

    ops: Client = {
        "poll: conditional GET, 304": poll,
        "poll: HEAD, compare ETag": lambda: fs.info(f"{base}/poll", refresh=True)["ETag"] == etag,
        # max_concurrency=1: one GET, as obstore's (by default cat_file sends a HEAD for the size first)
        "GET 10 KiB": lambda: fs.cat_file(f"{base}/10 KiB", max_concurrency=1),
        "GET 5 MiB": lambda: fs.cat_file(f"{base}/5 MiB", max_concurrency=1),
    }
    verdict = {}
    fs.pipe_file(f"{base}/cas-s", b"1", mode="create")
    try:
        fs.pipe_file(f"{base}/cas-s", b"2", mode="create")
        verdict["create-if-absent"] = "no: a second create succeeded"
    except FileExistsError:
        verdict["create-if-absent"] = 'yes: pipe_file(mode="create") -> FileExistsError'
    good = fs.info(f"{base}/cas-s", refresh=True)["ETag"]
    try:
        fs.pipe_file(f"{base}/cas-s", b"3", IfMatch='"0"')
        verdict["compare-and-swap"] = "no: a wrong ETag was accepted"
    except OSError:  # 412 PreconditionFailed -> OSError(EINVAL)
        fs.pipe_file(f"{base}/cas-s", b"3", IfMatch=good)
        verdict["compare-and-swap"] = "yes, unnamed: pipe_file(IfMatch=etag) kwarg to put_object -> OSError"
    return ops, verdict


def measure(clients: dict[str, Client], op: str, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of one call per client; the clients' order alternates by round."""
    names = list(clients)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm up: connections open, code paths taken
        for _ in range(3):
            clients[name][op]()
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = clients[name][op]
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            wall[name].append(t1 - t0)
            cpu[name].append(c1 - c0)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}


def import_seconds(module: str, repeats: int = 5) -> float:
    """Median over fresh interpreters of the wall time of `import module` (interpreter start left out)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True) for _ in range(repeats)
    ]
    return statistics.median(float(r.stdout) for r in runs)


def closure(name: str) -> set[str]:
    """The installed distributions ``name`` needs, itself included (extras not taken)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = canonicalize_name(todo.pop())
        if n in seen:
            continue
        try:
            dist = metadata.distribution(n)
        except metadata.PackageNotFoundError:
            continue
        seen.add(n)
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def installed_size(name: str) -> tuple[int, list[str]]:
    """Bytes on disk of ``name`` and the distributions it needs beyond the project's, and their names."""
    extra = sorted(closure(name) - (closure("muse-serve") - {"muse-serve"}))
    total = 0
    for n in extra:
        for f in metadata.distribution(n).files or []:
            path = f.locate()
            total += os.path.getsize(path) if os.path.isfile(path) else 0
    return total, extra


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200, help="rounds of the poll; the GETs take a quarter")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    try:
        importlib.import_module("s3fs")
        makers = {"obstore": obstore_client, "s3fs": s3fs_client}
    except ImportError:
        print("s3fs: not installed")
        makers = {"obstore": obstore_client}
    moto = start_moto()
    try:
        os.environ.update(moto.env)
        s3 = importlib.import_module("boto3").client("s3")
        s3.create_bucket(Bucket=BUCKET)
        for key, size in SIZES.items():
            s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=os.urandom(size))
        etag = s3.head_object(Bucket=BUCKET, Key=f"{PREFIX}/poll")["ETag"]
        built = {name: make(etag) for name, make in makers.items()}
        clients = {name: ops for name, (ops, _) in built.items()}
        results: dict[str, dict[str, Any]] = {name: dict(verdict) for name, (_, verdict) in built.items()}
        for op in next(iter(clients.values())):
            rounds = args.rounds if op.startswith("poll") else max(args.rounds // 4, 5)
            for name, (wall, cpu) in measure(clients, op, rounds).items():
                results[name][op] = {"wall_us": wall * 1e6, "cpu_us": cpu * 1e6, "rounds": rounds}
    finally:
        moto.stop()
    for name in makers:
        size, dists = installed_size(name)
        results[name]["import_ms"] = import_seconds(name) * 1e3
        results[name]["installed"] = {"mib": size / 2**20, "distributions": dists}

    names = list(makers)
    rows: list[list[object]] = []

    def row(label: str, cell: Callable[[dict[str, Any]], object]) -> None:
        rows.append([label, *(cell(results[n]) for n in names)])

    for op in clients[names[0]]:
        row(f"{op}: wall us", lambda r: f"{r[op]['wall_us']:,.0f}")
        row(f"{op}: client CPU us", lambda r: f"{r[op]['cpu_us']:,.0f}")
    poll = "poll: conditional GET, 304"
    row("poll CPU at 4 polls/s: s per day", lambda r: f"{r[poll]['cpu_us'] * 4 * 86400 / 1e6:,.0f}")
    row("create-if-absent", lambda r: r["create-if-absent"])
    row("compare-and-swap", lambda r: r["compare-and-swap"])
    row("import ms", lambda r: f"{r['import_ms']:.0f}")
    row("installed MiB beyond the project's deps", lambda r: f"{r['installed']['mib']:.1f}")
    versions = [f"{n} {metadata.version(n)}" for n in names]
    print(f"\n{', '.join(versions)}; moto {metadata.version('moto')} server on loopback; medians over rounds\n")
    print_table(["measure", *names], rows)
    for n in names:
        print(f"\n{n} installs: {', '.join(results[n]['installed']['distributions'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
