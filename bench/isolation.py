"""Noisy neighbours: one served model (the fraud-shaped 500-tree model of bench/http.py,
calibrated, auth on), a victim tenant sending 1-event requests at a modest constant rate,
and an aggressor tenant on the same model, in the same run:

- the victim alone;
- under (a) a 1-event JSON flood at the server's peak rate, (b) 1,000-event JSON
  requests, (c) binary OIP requests of 8,000 rows from 12 connections;

each without quotas and with the deployment's default quotas (QUOTAS below), and, with
``--edge``, with the aggressor's requests all refused (429) by HAProxy on another port before
they reach the server: the floor of any admission design on this machine, where the load
generators, the edge and the server share the same cores.  Load comes
from bench/loadgen.c (open loop, latency from each request's intended send time); the
aggressor's answers are counted by status from its trace.

    python -m muse.bench.isolation [--seconds 6] [--workers 2] [--victim-rate 100] [--edge]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import subprocess
import sys
import tempfile
import threading

import msgspec
import numpy as np

from muse.bench.http import build_loadgen, build_registry, run_load, sweep
from muse.bench.models import fraud_like_matrix
from muse.bench.timing import print_table
from muse.core.deploy import DeploymentStore
from muse.core.registry import Registry
from muse.core.spec import QuotaSpec
from muse.server import testing
from muse.server.auth import add_key, keys_path
from muse.server.demo.cluster import find_haproxy

# The policy measured as "quotas on": every tenant at most 5,000 rows/s (bursts of 10,000)
# and 4,096 rows in flight -- about a third of the server's 1-event capacity each.
QUOTAS = [QuotaSpec("*", rows_per_second=5000, burst_rows=10_000, max_inflight_rows=4096)]
PEAK_RATES = (4000, 6000, 8000, 10000, 12500, 15000, 17500, 20000, 25000)


def raw_request(port: int, key: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def v1_request(port: int, key: str, tenant: str, rows: int, seed: int) -> bytes:
    X, _ = fraud_like_matrix(rows, seed=seed)
    events = [{"features": [None if v != v else round(float(v), 3) for v in row]} for row in X]
    body = json.dumps({"tenant": tenant, "intent": "fraud", "events": events}).encode()
    return raw_request(port, key, "/v1/score", body, {"Content-Type": "application/json"})


def binary_request(port: int, key: str, rows: int) -> bytes:
    X, _ = fraud_like_matrix(rows, seed=5)
    data = X.astype("<f8").tobytes()
    tensor = {"name": "features", "shape": list(X.shape), "datatype": "FP64"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}]}).encode()
    return raw_request(
        port,
        key,
        "/v2/models/fraud/infer",
        header + data,
        {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )


EDGE_CONFIG = """\
global
    maxconn 4096
defaults
    mode http
    timeout client 30s
    timeout connect 5s
    timeout server 30s
frontend edge
    bind 127.0.0.1:{port}
    http-request return status 429 content-type application/json string "{{}}"
"""


class Edge:
    """HAProxy answering 429 to every request, as an edge rate limit refusing a tenant over its
    quota would, before the request reaches the server."""

    def __init__(self, work: pathlib.Path):
        binary = find_haproxy()
        if binary is None:
            raise SystemExit("--edge needs HAProxy (Debian's haproxy package)")
        self.port = testing.free_port()
        config = work / "edge.cfg"
        config.write_text(EDGE_CONFIG.format(port=self.port))
        self.proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL)
        testing.wait_answering(self.proc, self.port, "/", 429, "HAProxy's edge", 30)

    def stop(self) -> None:
        testing.stop_process(self.proc, 10)


class Bench:
    def __init__(self, args: argparse.Namespace, work: pathlib.Path):
        self.args, self.work = args, work
        self.loadgen = build_loadgen(work)
        self.registry, self.victim_key = build_registry(work, args.results)
        self.aggressor_key = add_key(keys_path(self.registry), "globex", False)[1]
        self.server = testing.LocalServer(self.registry, workers=args.workers)
        self.server.wait_ready(timeout=120)
        port = self.server.port
        self.files = {
            name: self.write(name, raw)
            for name, raw in {
                "victim": v1_request(port, self.victim_key, "acme", 1, 11),
                "flood": v1_request(port, self.aggressor_key, "globex", 1, 12),
                "json1000": v1_request(port, self.aggressor_key, "globex", 1000, 13),
                "binary8000": binary_request(port, self.aggressor_key, 8000),
            }.items()
        }

    def write(self, name: str, raw: bytes) -> pathlib.Path:
        path = self.work / f"{name}.http"
        path.write_bytes(raw)
        return path

    def quotas(self, on: bool) -> None:
        store = DeploymentStore(Registry(self.registry))
        spec = store.read(store.current_generation() or 1)
        generation = store.apply(msgspec.structs.replace(spec, quotas=QUOTAS if on else []))
        self.server.wait_ready(generation=generation)

    def peak(self) -> float:
        results = sweep(self.loadgen, self.files["flood"], self.server.port, 2.0, 64, PEAK_RATES)
        return max(r["achieved_rps"] for r in results)

    def victim_under(self, aggressor: tuple[str, float, int] | None, aggressor_port: int | None = None) -> dict:
        """The victim's load, alone or beside ``aggressor`` (request file, rate, connections),
        sent to the server or to ``aggressor_port``."""
        seconds = self.args.seconds
        out: dict = {}
        threads = []
        if aggressor is not None:
            name, rate, connections = aggressor
            trace = self.work / f"trace-{name}.txt"

            def attack() -> None:
                port = aggressor_port or self.server.port
                argv = [str(self.loadgen), "127.0.0.1", str(port), str(rate), str(seconds + 1)]
                argv += [str(connections), str(self.files[name]), str(trace)]
                out["aggressor"] = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
                statuses = np.loadtxt(trace, dtype=np.int64, ndmin=2)[:, 1]
                out["aggressor_status"] = dict(collections.Counter(statuses.tolist()))

            threads.append(threading.Thread(target=attack))
            threads[-1].start()
        out["victim"] = run_load(
            self.loadgen, self.files["victim"], self.server.port, self.args.victim_rate, seconds, 4
        )
        for t in threads:
            t.join()
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--victim-rate", type=float, default=100.0, help="the victim's 1-event requests/s")
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument(
        "--edge", action="store_true", help="also: the aggressor's requests all refused by HAProxy, off the server"
    )
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, pathlib.Path(tmp))
        try:
            print("finding the peak of 1-event requests ...", file=sys.stderr, flush=True)
            peak = bench.peak()
            aggressors = {
                "(a) 1-event JSON flood": ("flood", peak, 64),
                "(b) 1,000-event JSON": ("json1000", 60.0, 8),
                "(c) binary OIP, 8,000 rows": ("binary8000", 60.0, 12),
            }
            for on in (False, True):
                bench.quotas(on)
                label = "on" if on else "off"
                print(f"quotas {label}: victim alone ...", file=sys.stderr, flush=True)
                rows.append(row("victim alone", label, bench.victim_under(None)))
                for name, aggressor in aggressors.items():
                    print(f"quotas {label}: {name} ...", file=sys.stderr, flush=True)
                    rows.append(row(name, label, bench.victim_under(aggressor)))
            if args.edge:
                edge = Edge(pathlib.Path(tmp))
                try:
                    print("edge: victim alone ...", file=sys.stderr, flush=True)
                    rows.append(row("victim alone", "edge", bench.victim_under(None)))
                    for name, aggressor in aggressors.items():
                        print(f"edge: {name} ...", file=sys.stderr, flush=True)
                        rows.append(row(name, "edge", bench.victim_under(aggressor, edge.port)))
                finally:
                    edge.stop()
        finally:
            bench.server.stop()
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "isolation.json").write_text(json.dumps(rows, indent=1))
    print()
    print(
        f"victim: 1-event requests at {args.victim_rate:,.0f}/s over 4 connections; {args.workers} workers; "
        f"{args.seconds:g} s a run; flood at the measured peak, {peak:,.0f} req/s"
    )
    table = [
        [
            r["aggressor"],
            r["quotas"],
            f"{r['victim_p50_ms']:.2f}",
            f"{r['victim_p99_ms']:.2f}",
            f"{r['victim_p999_ms']:.2f}",
            r["victim_errors"],
            r["aggressor_answers"],
        ]
        for r in rows
    ]
    headers = ["aggressor", "quotas", "victim p50 ms", "p99 ms", "p99.9 ms", "victim errors", "aggressor answers/s"]
    print_table(headers, table)


def row(aggressor: str, quotas: str, result: dict) -> dict:
    victim = result["victim"]
    answers = "-"
    if "aggressor_status" in result:
        seconds = result["aggressor"]["ok"] + result["aggressor"]["errors"]
        rate = result["aggressor"]["target_rps"]
        span = seconds / rate if rate else 1.0
        answers = ", ".join(
            f"{'broken' if code < 0 else code}: {n / span:,.0f}"
            for code, n in sorted(result["aggressor_status"].items())
        )
    return {
        "aggressor": aggressor,
        "quotas": quotas,
        "victim_p50_ms": victim["p50_us"] / 1e3,
        "victim_p99_ms": victim["p99_us"] / 1e3,
        "victim_p999_ms": victim["p999_us"] / 1e3,
        "victim_errors": victim["errors"],
        "aggressor_answers": answers,
    }


if __name__ == "__main__":
    main()
