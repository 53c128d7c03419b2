"""Faults under load: each scenario starts `muse serve` (the 500-tree fraud model of
bench/http.py, calibrated, auth on, score log on), puts it under steady open-loop load
(bench/loadgen.c, batch 1), does one harmful thing a few seconds in, and reports what the
load saw: failed requests, p99 before and during the fault, and the scenario's own measure.

- kill -9 of a worker: the time until every worker is live and ready again;
- 5,000 idle connections (kept at 5,000: the attacker reopens what the server closes);
- slow bodies: 100 clients trickling a byte a second (each should get 408);
- a full score-log disk (a 256 KiB tmpfs, root only): every score served is on disk or
  counted as dropped, and none is unaccounted for;
- a library that crashes when loaded, submitted for validation: refused, and no worker dies.

    python -m muse.bench.faults [--rate 2000] [--seconds 12] [--workers 2] [--only kill,idle]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import polars as pl

from muse.bench.http import build_loadgen, build_registry, request_file
from muse.bench.timing import print_table
from muse.compile.manifest import read_manifest, sha256_file, write_manifest
from muse.core.deploy import DeploymentStore
from muse.core.registry import Registry
from muse.core.spec import PredictorSpec
from muse.server import testing
from muse.server.auth import add_key, keys_path

FAULT_AT = 3.0  # seconds into the load
IDLE = 5000
SLOW_CLIENTS = 100
SLOW_GIVE_UP = 30.0  # seconds a slow client trickles before it gives up waiting for an answer
DISK_BYTES = 256 << 10
CRASH_C = "#include <signal.h>\n__attribute__((constructor)) static void boom(void) { raise(SIGSEGV); }\n"


class Run:
    """One scenario's load: loadgen in the background with a per-request trace."""

    def __init__(self, bench: Bench, server: testing.LocalServer, name: str):
        self.trace = bench.work / f"trace-{name}.txt"
        request = request_file(bench.work, server.port, bench.key)
        argv = [str(bench.loadgen), "127.0.0.1", str(server.port), str(bench.rate), str(bench.seconds)]
        argv += [str(bench.connections), str(request), str(self.trace)]
        self.started = time.monotonic() + 0.2  # loadgen's clock starts 200 ms after it does
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)

    def at(self, seconds: float) -> None:
        """Sleep until ``seconds`` into the load (a benchmark's schedule, not a test's wait)."""
        time.sleep(max(0.0, self.started + seconds - time.monotonic()))

    def now(self) -> float:
        return time.monotonic() - self.started

    def finish(self, fault_at: float) -> dict[str, Any]:
        summary = json.loads(self.proc.communicate()[0])
        t, status, latency = np.loadtxt(self.trace, dtype=np.int64, ndmin=2).T
        t_s = t / 1e6
        failed = status != 200
        before, during = (t_s < fault_at) & ~failed, (t_s >= fault_at) & ~failed
        last_failure = float(t_s[failed].max() - fault_at) if failed.any() else None
        return {
            "requests": int(t.size),
            "failed": int(failed.sum()),
            "p99_before_ms": float(np.percentile(latency[before], 99) / 1e3) if before.any() else None,
            "p99_during_ms": float(np.percentile(latency[during], 99) / 1e3) if during.any() else None,
            "last_failure_s": last_failure,
            "achieved_rps": summary["achieved_rps"],
        }


Fault = Callable[["Bench", testing.LocalServer, Run], dict]


class Bench:
    def __init__(self, args: argparse.Namespace, work: pathlib.Path):
        self.work = work
        self.rate, self.seconds, self.connections, self.workers = (
            args.rate,
            args.seconds,
            args.connections,
            args.workers,
        )
        self.loadgen = build_loadgen(work)
        self.registry, self.key = build_registry(work, args.results)
        self.admin = add_key(keys_path(self.registry), None, True)[1]

    def server(self, *extra: str) -> testing.LocalServer:
        server = testing.LocalServer(self.registry, *extra, workers=self.workers)
        server.wait_ready(timeout=120)
        testing.wait_until(lambda: len(ready_workers(server.port)) == self.workers, 120, "every worker ready")
        return server

    def scenario(self, name: str, fault: Fault, *extra: str) -> dict:
        print(f"{name} ...", file=sys.stderr, flush=True)
        server = self.server(*extra)
        try:
            run = Run(self, server, name)
            run.at(FAULT_AT)
            observed = fault(self, server, run)
            result = run.finish(FAULT_AT)
            observed.update(after_stop(server, observed))
        finally:
            if server.proc.poll() is None:
                server.stop()
        return {"scenario": name, **result, **observed}


def metrics(port: int) -> dict[str, float]:
    try:
        return testing.scrape(port)
    except (OSError, RuntimeError):
        return {}


def ready_workers(port: int) -> list[str]:
    return [k for k, v in metrics(port).items() if k.startswith("muse_ready{") and v == 1]


def after_stop(server: testing.LocalServer, observed: dict) -> dict:
    """The score log's accounting, for the scenario that asked for it (read after SIGTERM)."""
    disk = observed.pop("_score_log", None)
    if disk is None:
        return {}
    served = observed.pop("_served")
    server.stop()
    lost = sum(int(n) for n in re.findall(r"(\d+) records could not be written", server.output(whole=True)))
    written = 0
    for f in pathlib.Path(disk).glob("scores-*.parquet"):
        written += pl.scan_parquet(f).select(pl.len()).collect().item()
    dropped = observed.pop("_dropped")
    return {
        "records_served": served,
        "records_on_disk": written,
        "records_counted_dropped": dropped + lost,
        "records_unaccounted": served - written - dropped - lost,
    }


# -- the faults ---------------------------------------------------------------------------


def kill_worker(bench: Bench, server: testing.LocalServer, run: Run) -> dict:
    victim = int(re.search(r'pid="(\d+)"', ready_workers(server.port)[0]).group(1))  # type: ignore[union-attr]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    while True:
        ready = ready_workers(server.port)
        if len(ready) == bench.workers and not any(f'pid="{victim}"' in k for k in ready):
            break
        time.sleep(0.02)
    return {
        "recovered_s": round(time.monotonic() - killed, 3),
        "restarts": metrics(server.port).get("muse_worker_restarts_total"),
    }


def idle_connections(bench: Bench, server: testing.LocalServer, run: Run) -> dict:
    """Keep IDLE connections open that never send a byte, reopening what the server closes."""
    selector = selectors.DefaultSelector()

    def connect() -> None:
        s = socket.create_connection(("127.0.0.1", server.port))
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)

    for _ in range(IDLE):
        connect()
    reopened = 0
    end = run.started + bench.seconds
    while time.monotonic() < end - 0.5:
        for key, _ in selector.select(timeout=0.2):
            selector.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
            connect()
            reopened += 1
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    selector.close()
    return {"idle_connections": IDLE, "reopened": reopened}


def slow_bodies(bench: Bench, server: testing.LocalServer, run: Run) -> dict:
    """SLOW_CLIENTS clients send headers, then a byte of their body a second, until answered
    (the server's --body-timeout, default 10 s, may outlast the load: they go on after it)."""
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bench.key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
    ).encode()
    clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(SLOW_CLIENTS)]
    for c in clients:
        c.sendall(head)
        c.setblocking(False)
    answers: dict[int, bytes] = {}
    started = time.monotonic()
    while len(answers) < len(clients) and time.monotonic() - started < SLOW_GIVE_UP:
        for i, c in enumerate(clients):
            if i in answers:
                continue
            try:
                answers[i] = c.recv(4096) or b"closed"
            except BlockingIOError:
                try:
                    c.send(b" ")
                except OSError:
                    answers[i] = b"closed"
        time.sleep(1.0)
    for c in clients:
        c.close()
    return {
        "slow_clients": SLOW_CLIENTS,
        "slow_clients_408": sum(a.startswith(b"HTTP/1.1 408") for a in answers.values()),
        "slow_answered_s": round(time.monotonic() - started, 1),
    }


def full_disk(disk: pathlib.Path) -> Fault:
    def fault(bench: Bench, server: testing.LocalServer, run: Run) -> dict:
        # the disk fills by itself as the log grows; wait out the load, then read the counts
        run.at(bench.seconds + 0.3)
        m = metrics(server.port)
        dropped = sum(v for k, v in m.items() if k.startswith("muse_scorelog_dropped_records_total"))
        return {
            "_score_log": str(disk),
            "_served": int(sum(v for k, v in m.items() if k.startswith("muse_events_scored_total"))),
            "_dropped": int(dropped),
            "disk_bytes": DISK_BYTES,
        }

    return fault


def crashing_library(bench: Bench) -> Fault:
    reg = Registry(bench.registry)
    source = reg.model_dir("fraud", "1")
    target = reg.models_dir / "fraud-crash" / "1"
    if not target.exists():
        shutil.copytree(source, target)
        manifest = read_manifest(target)
        c_file = bench.work / "crash.c"
        c_file.write_text(CRASH_C)
        lib = target / manifest.library_file
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(c_file)], check=True)
        write_manifest(target, msgspec.structs.replace(manifest, library_sha256=sha256_file(lib)))
    spec = DeploymentStore(reg).read(DeploymentStore(reg).current_generation() or 1)
    spec = msgspec.structs.replace(
        spec, predictors=[*spec.predictors, PredictorSpec("fraud-crash", "1", "fraud", ["fraud-crash/1"])]
    )

    def fault(bench: Bench, server: testing.LocalServer, run: Run) -> dict:
        status, body, _ = server.post("/admin/deployment/validate", msgspec.to_builtins(spec), bench.admin)
        return {
            "validate_status": status,
            "validate_error": body.get("error", "") if isinstance(body, dict) else "",
            "restarts": metrics(server.port).get("muse_worker_restarts_total"),
        }

    return fault


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="requests/s of the steady load")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each scenario's load")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument("--only", help="comma-separated: kill,idle,slow,disk,library")
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the idle connections are ours
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        bench = Bench(args, work)
        chosen = set(args.only.split(",")) if args.only else {"kill", "idle", "slow", "disk", "library"}
        if "kill" in chosen:
            results.append(bench.scenario("kill -9 a worker", kill_worker))
        if "idle" in chosen:
            results.append(bench.scenario(f"{IDLE:,} idle connections", idle_connections))
        if "slow" in chosen:
            results.append(bench.scenario(f"{SLOW_CLIENTS} slow-body clients", slow_bodies))
        if "disk" in chosen:
            disk = work / "disk"
            disk.mkdir()
            mounted = (
                os.geteuid() == 0
                and not subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(disk)], capture_output=True
                ).returncode
            )
            if not mounted:
                print("full disk: skipped (needs root to mount a small tmpfs)", file=sys.stderr)
            else:
                try:
                    results.append(
                        bench.scenario(
                            f"full score-log disk ({DISK_BYTES >> 10} KiB)",
                            full_disk(disk),
                            "--score-log",
                            str(disk),
                            "--score-log-flush-seconds",
                            "0.5",
                        )
                    )
                finally:
                    subprocess.run(["umount", str(disk)], check=False)
        if "library" in chosen:
            results.append(bench.scenario("crashing library validated", crashing_library(bench)))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "faults.json").write_text(json.dumps(results, indent=1))

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:,.1f}"

    rows = []
    for r in results:
        if "recovered_s" in r:
            note = (
                f"all workers ready again after {r['recovered_s']:.2f} s; last failed request "
                f"{r['last_failure_s']:.2f} s after the kill; restarts counted: {r['restarts']:.0f}"
            )
        elif "idle_connections" in r:
            note = f"{r['reopened']:,} idle connections closed by the server (and reopened)"
        elif "slow_clients" in r:
            note = (
                f"{r['slow_clients_408']} of {r['slow_clients']} slow clients got 408 (after {r['slow_answered_s']} s)"
            )
        elif "records_served" in r:
            note = (
                f"{r['records_served']:,} scores served: {r['records_on_disk']:,} on disk, "
                f"{r['records_counted_dropped']:,} counted dropped, {r['records_unaccounted']:,} unaccounted"
            )
        else:
            why = re.sub(r"^.*\.so: ", "", r["validate_error"])[:70]  # the library path is long
            note = f"validate: {r['validate_status']} ({why}...); worker restarts: {r['restarts']:.0f}"
        rows.append(
            [r["scenario"], f"{r['requests']:,}", r["failed"], ms(r["p99_before_ms"]), ms(r["p99_during_ms"]), note]
        )
    print()
    print(
        f"steady load: {args.rate:,.0f} req/s over {args.connections} connections, {args.workers} workers, "
        f"fault at {FAULT_AT:.0f} s of {args.seconds:.0f} s"
    )
    print_table(["fault", "requests", "failed", "p99 before ms", "p99 during ms", "what happened"], rows)


if __name__ == "__main__":
    main()
