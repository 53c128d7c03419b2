"""Noisy neighbours: one served model (the fraud-shaped 500-tree model of bench/http.py,
calibrated, auth on), a victim tenant sending 1-event requests at a modest constant rate,
and an aggressor tenant on the same model, in the same run:

- the victim alone;
- under (a) a 1-event JSON flood at the server's peak rate, (b) 1,000-event JSON
  requests, (c) binary OIP requests of 8,000 rows from 12 connections;

each without quotas ("off"), with the deployment's default quota enforced by the server alone
("app"), and with the same quota enforced also by `muse edge` (HAProxy in front, which refuses a
tenant's excess requests before they reach the server): the aggressor through it and the victim
straight to the server, as through an edge with cores of its own ("edge"), or both through it
("edge, victim too").  The default quota gives every tenant ``--quota-share`` of the server's
measured peak of 1-event requests, in rows/s.  Each set of runs has an aggressor tenant of its
own.  Load comes from bench/loadgen.c (open loop, latency from each request's intended send
time); the aggressor's answers are counted by status from its trace, and the server's own 429s
from its metrics.  ``--pin``: the server and the victim's load generator on the last core, the
aggressor's load generator and the edge on the others.

    python -m muse.bench.isolation [--seconds 6] [--workers 2] [--victim-rate 200] [--quota-share 0.1] [--pin]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
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
from muse.server.edge import Edge, find_haproxy, render


def default_quota(peak: float, share: float) -> list[QuotaSpec]:
    """The policy measured as "quotas on": every tenant ``share`` of the server's peak in rows/s
    (bursts of two seconds of it) and 4,096 rows in flight."""
    rate = max(1.0, round(share * peak))
    return [QuotaSpec("*", rows_per_second=rate, burst_rows=max(1, round(2 * rate)), max_inflight_rows=4096)]


# off: no quotas; app: the server enforces them; edge: `muse edge` refuses the aggressor's excess
# before the server (the victim sent straight to the server, as through an edge with cores of its
# own); "edge, victim too": the victim's requests through the same edge, which on this machine
# shares its core with the load generators.
LABELS = ("off", "app", "edge", "edge, victim too")
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


class Bench:
    def __init__(self, args: argparse.Namespace, work: pathlib.Path):
        self.args, self.work = args, work
        self.loadgen = build_loadgen(work)
        self.registry, self.victim_key = build_registry(work, args.results)
        # an aggressor tenant of its own for each set of runs: a set's runs leave its tenant in
        # debt (a request larger than its burst is admitted alone), which the next set must not inherit
        keys = [add_key(keys_path(self.registry), f"globex-{i}", False)[1] for i in range(len(LABELS))]
        cores = sorted(os.sched_getaffinity(0))
        # --pin: the server and the victim's load generator on the last core; the aggressor's load
        # generator and the edge on the others, so that the aggressor's side takes no core of the
        # victim's path (a flood costs the machine that sends it, and the edge, not the server).
        self.victim_cores = cores[-1:] if args.pin and len(cores) > 1 else cores
        self.aggressor_cores = cores[:-1] if args.pin and len(cores) > 1 else cores
        os.sched_setaffinity(0, self.victim_cores)
        self.server = testing.LocalServer(self.registry, workers=args.workers)
        os.sched_setaffinity(0, self.aggressor_cores)  # what starts from here on, unless pinned again
        self.server.wait_ready(timeout=120)
        port = self.server.port
        self.files = {"victim": self.write("victim", v1_request(port, self.victim_key, "acme", 1, 11))}
        for i, key in enumerate(keys):
            for kind, raw in {
                "flood": v1_request(port, key, f"globex-{i}", 1, 12),
                "json1000": v1_request(port, key, f"globex-{i}", 1000, 13),
                "binary8000": binary_request(port, key, 8000),
            }.items():
                self.files[f"{kind}-{i}"] = self.write(f"{kind}-{i}", raw)

    def write(self, name: str, raw: bytes) -> pathlib.Path:
        path = self.work / f"{name}.http"
        path.write_bytes(raw)
        return path

    def quotas(self, quotas: list[QuotaSpec]) -> None:
        store = DeploymentStore(Registry(self.registry))
        spec = store.read(store.current_generation() or 1)
        generation = store.apply(msgspec.structs.replace(spec, quotas=quotas))
        self.server.wait_ready(generation=generation)

    def edge(self) -> Edge:
        """`muse edge` in front of the server, on the registry's current quotas and keys."""
        bind = f"127.0.0.1:{testing.free_port()}"
        config = render(self.registry, self.work / "edge", [f"127.0.0.1:{self.server.port}"], bind)
        edge = Edge(config)
        testing.wait_answering(edge.proc, edge.port, "/v2/health/ready", 200, "the edge's backend", 30)
        return edge

    def peak(self) -> float:
        results = sweep(self.loadgen, self.files["flood-0"], self.server.port, 2.0, 64, PEAK_RATES)
        return max(r["achieved_rps"] for r in results)

    def victim_under(
        self,
        aggressor: tuple[str, float, int] | None,
        victim_port: int | None = None,
        aggressor_port: int | None = None,
    ) -> dict:
        """The victim's load, alone or beside ``aggressor`` (request file's name, rate,
        connections), each sent to the server or to its port (the edge's)."""
        seconds = self.args.seconds
        out: dict = {}
        threads = []
        refused = self.refused_by_server()
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
        port = victim_port or self.server.port
        os.sched_setaffinity(0, self.victim_cores)  # this thread's, for the victim's load generator
        try:
            out["victim"] = run_load(self.loadgen, self.files["victim"], port, self.args.victim_rate, seconds, 4)
        finally:
            os.sched_setaffinity(0, self.aggressor_cores)
        for t in threads:
            t.join()
        out["server_refused"] = self.refused_by_server() - refused
        return out

    def refused_by_server(self) -> float:
        """Requests the server has answered 429 (over quota) so far."""
        samples = self.server.metrics().items()
        return sum(v for k, v in samples if k.startswith("muse_request_errors_total{") and '"over_quota"' in k)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--victim-rate", type=float, default=200.0, help="the victim's 1-event requests/s")
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument(
        "--quota-share", type=float, default=0.1, help="each tenant's quota as a share of the measured peak"
    )
    parser.add_argument("--no-edge", action="store_true", help="skip the runs through `muse edge` (HAProxy)")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the server and the victim's load on the last core, the aggressor's load and the edge on the others",
    )
    args = parser.parse_args(argv)
    edge = not args.no_edge and find_haproxy() is not None
    if not args.no_edge and not edge:
        print("HAProxy not found (Debian's haproxy package): no runs through the edge", file=sys.stderr)
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
            quotas = default_quota(peak, args.quota_share)
            for label in LABELS if edge else LABELS[:2]:
                bench.quotas([] if label == "off" else quotas)
                front = bench.edge() if label.startswith("edge") else None
                try:
                    aggressor_port = front.port if front else None
                    victim_port = aggressor_port if label == "edge, victim too" else None
                    print(f"quotas {label}: victim alone ...", file=sys.stderr, flush=True)
                    rows.append(row("victim alone", label, bench.victim_under(None, victim_port)))
                    for name, aggressor in aggressors.items():
                        print(f"quotas {label}: {name} ...", file=sys.stderr, flush=True)
                        kind, rate, connections = aggressor
                        own = (f"{kind}-{LABELS.index(label)}", rate, connections)  # the set's own tenant
                        result = bench.victim_under(own, victim_port, aggressor_port)
                        rows.append(row(name, label, result))
                finally:
                    if front:
                        front.stop()
        finally:
            bench.server.stop()
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "isolation.json").write_text(json.dumps(rows, indent=1))
    print()
    print(
        f"victim: 1-event requests at {args.victim_rate:,.0f}/s over 4 connections; {args.workers} workers; "
        f"{args.seconds:g} s a run; flood at the measured peak, {peak:,.0f} req/s; "
        f"quota {quotas[0].rows_per_second:,.0f} rows/s a tenant ({args.quota_share:g} of the peak)"
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
            f"{r['server_refused_per_s']:,.0f}",
        ]
        for r in rows
    ]
    headers = ["aggressor", "quotas", "victim p50 ms", "p99 ms", "p99.9 ms", "victim errors", "aggressor answers/s"]
    headers.append("429s by the server/s")
    print_table(headers, table)


def row(aggressor: str, quotas: str, result: dict) -> dict:
    victim = result["victim"]
    answers = "-"
    span = victim["ok"] + victim["errors"]  # seconds of the run: the victim's requests over its rate
    span = span / victim["target_rps"] if victim["target_rps"] else 1.0
    if "aggressor_status" in result:
        sent = result["aggressor"]["ok"] + result["aggressor"]["errors"]
        rate = result["aggressor"]["target_rps"]
        span = sent / rate if rate else 1.0
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
        "server_refused_per_s": result["server_refused"] / span,
    }


if __name__ == "__main__":
    main()
