"""HTTP scoring benchmark: open-loop load at rising rates against `muse serve`
(fraud-shaped 500-tree model, calibrated, auth on) and against a no-op
Granian + msgspec endpoint that decodes the same request, in the same run
(rounds alternate the two, and the peak ratio is the median of the rounds');
then, at half of each one's peak, steady load, and for MUSE the same load with a
promotion to a newly loaded library in the middle.

Load comes from bench/loadgen.c (compiled here with the C compiler): constant
arrival rate over keep-alive connections, latency from each request's
intended send time, so a stalled server cannot hide its queue (no
coordinated omission).  Every request is batch 1: one event of 100 features.

    python -m muse.bench.http [--seconds 4] [--rounds 3] [--workers 1] [--connections 64]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from muse.bench.models import fraud_like_matrix, train_lightgbm
from muse.bench.timing import print_table
from muse.server import testing as local

HERE = pathlib.Path(__file__).parent
RATES = (1000, 2000, 4000, 6000, 8000, 10000, 12500, 15000, 17500, 20000, 22500, 25000, 30000)


def build_loadgen(workdir: pathlib.Path) -> pathlib.Path:
    exe = workdir / "loadgen"
    cc = os.environ.get("CC", "gcc")
    subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(HERE / "loadgen.c")], check=True)
    return exe


def build_registry(workdir: pathlib.Path, results: pathlib.Path, batching: str = "") -> tuple[pathlib.Path, str]:
    """Compile the fraud model, calibrate it, deploy it; returns (registry, tenant key).
    ``batching``: TOML lines of the model's batching settings (e.g. "inline_max_us = 0")."""
    import msgspec

    from muse.calib import AlertRateCurve, ReferenceFile
    from muse.compile import build_artifact
    from muse.core.spec import BatchingSpec, DeploymentSpec, PredictorSpec, RouteSpec
    from muse.server.auth import add_key, keys_path
    from muse.server.testing import build_registry as new_registry
    from muse.server.testing import deploy, fit_calibration

    curve = AlertRateCurve([0.2, 0.5, 0.6, 0.8], [0.70, 0.35, 0.10, 0.05])
    reg = new_registry(workdir / "registry", references=[ReferenceFile("fraud", curve)])
    model_file = train_lightgbm(results / "fraud_500x63.txt", trees=500, leaves=63)
    X, _ = fraud_like_matrix(20000, seed=3)
    # Version 2 is the same model built again: a promotion to it loads a new library for real.
    for version in ("1", "2"):
        print(f"compiling the 500-tree model, version {version} ...", file=sys.stderr, flush=True)
        build_artifact(model_file, reg.models_dir, name="fraud", version=version, beta=0.1)
        fit_calibration(reg, f"fraud/{version}", X, reference="fraud", name="fraud", version=version)
    deploy(
        reg,
        DeploymentSpec(
            predictors=[
                PredictorSpec(f"fraud-v{v}", v, "fraud", [f"fraud/{v}"], calibration=f"fraud/{v}") for v in "12"
            ],
            routes=[RouteSpec("*", "fraud", "fraud-v1")],
            batching={"fraud/1": msgspec.toml.decode(batching.encode(), type=BatchingSpec)},
        ),
    )
    _, key = add_key(keys_path(reg.root), "acme", False)
    return reg.root, key


def request_file(workdir: pathlib.Path, port: int, key: str) -> pathlib.Path:
    X, _ = fraud_like_matrix(1, seed=11)
    body = json.dumps(
        {
            "tenant": "acme",
            "intent": "fraud",
            "events": [{"features": [None if v != v else round(float(v), 6) for v in X[0]]}],
        }
    ).encode()
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    path = workdir / f"request-{port}.http"
    path.write_bytes(head + body)
    return path


class Process:
    def __init__(self, argv: list[str], port: int):
        self.port = port
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            local.wait_for(port, timeout=120, process=self.proc)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def sweep(loadgen, req: pathlib.Path, port: int, seconds: float, connections: int, rates) -> list[dict]:
    results = []
    for rate in rates:
        r = run_load(loadgen, req, port, rate, seconds, connections)
        results.append(r)
        print(
            f"  {rate:>6} req/s -> {r['achieved_rps']:>8.0f} achieved, p99 {r['p99_us']:>9.0f} us",
            file=sys.stderr,
            flush=True,
        )
        if r["achieved_rps"] < 0.9 * rate or r["p99_us"] > 200_000:
            break  # saturated: past the peak
    return results


def run_load(loadgen, req, port, rate, seconds, connections) -> dict:
    out = subprocess.run(
        [str(loadgen), "127.0.0.1", str(port), str(rate), str(seconds), str(connections), str(req)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def load_with_promotion(loadgen, req, port, rate, seconds, connections, registry: pathlib.Path) -> dict:
    """The same open-loop load, with `muse promote fraud-v2` a quarter of the way in."""
    from muse.core.deploy import DeploymentStore
    from muse.core.registry import Registry

    out = {}
    runner = threading.Thread(target=lambda: out.update(run_load(loadgen, req, port, rate, seconds, connections)))
    runner.start()
    time.sleep(0.2 + seconds / 4)
    generation = DeploymentStore(Registry(registry)).promote("fraud-v2")
    print(f"  promoted fraud-v2 (generation {generation}) under {rate:,.0f} req/s", file=sys.stderr, flush=True)
    runner.join()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument("--batching", default="", help='TOML lines for the model, e.g. "inline_max_us = 0"')
    parser.add_argument("--rates", default=",".join(map(str, RATES)), help="comma-separated request rates")
    parser.add_argument("--rounds", type=int, default=3, help="peak sweeps of each server, alternating")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        loadgen = build_loadgen(work)
        registry, key = build_registry(work, args.results, args.batching.replace(";", "\n"))
        granian = [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--loop",
            "uvloop",
            "--workers",
            str(args.workers),
            "--backlog",
            "2048",
            "--no-ws",
        ]  # as `muse serve` runs it

        def start_noop() -> Process:
            port = local.free_port()
            return Process([*granian, "--port", str(port), "muse.bench.noop_app:app"], port)

        def start_muse() -> local.LocalServer:
            server = local.LocalServer(registry, workers=args.workers)
            server.wait_ready(timeout=120)
            return server

        servers: dict[str, Callable[[], Process | local.LocalServer]] = {
            "no-op granian+msgspec": start_noop,
            "muse /v1/score": start_muse,
        }
        started: dict[str, Process | local.LocalServer] = {}
        try:
            for label, start in servers.items():
                started[label] = start()
            reqs = {label: request_file(work, server.port, key) for label, server in started.items()}
            rates = [float(r) for r in args.rates.split(",")]
            # Rounds alternate the two servers, so that both see the same moments of a shared,
            # noisy machine; the ratio is taken within each round, and its median reported.
            sweeps: dict[str, list[list[dict]]] = {label: [] for label in servers}
            for n in range(args.rounds):
                for label, server in started.items():
                    print(f"{label}, round {n + 1}:", file=sys.stderr, flush=True)
                    results = sweep(loadgen, reqs[label], server.port, args.seconds, args.connections, rates)
                    if results[0]["errors"]:
                        raise RuntimeError(f"{label}: {results[0]['errors']} failed requests at the lowest rate")
                    sweeps[label].append(results)
            peaks = {
                label: [max(r["achieved_rps"] for r in results) for results in runs] for label, runs in sweeps.items()
            }
            half = {}
            for label, server in started.items():
                rate = statistics.median(peaks[label]) / 2
                half[label] = run_load(loadgen, reqs[label], server.port, rate, args.seconds, args.connections)
            muse_server = started["muse /v1/score"]
            swap = load_with_promotion(
                loadgen,
                reqs["muse /v1/score"],
                muse_server.port,
                statistics.median(peaks["muse /v1/score"]) / 2,
                args.seconds,
                args.connections,
                registry,
            )
        finally:
            for server in started.values():
                server.stop()

    def row(label: str, r: dict) -> list:
        return [
            label,
            f"{r['target_rps']:,.0f}",
            f"{r['achieved_rps']:,.0f}",
            f"{r['p50_us']:,.0f}",
            f"{r['p99_us']:,.0f}",
            f"{r['p999_us']:,.0f}",
            r["errors"],
        ]

    noop, muse = peaks["no-op granian+msgspec"], peaks["muse /v1/score"]
    ratios = [m / o for m, o in zip(muse, noop)]
    shown = ratios.index(sorted(ratios)[len(ratios) // 2])  # the round of the median ratio
    table = [row(label, r) for label, runs in sweeps.items() for r in runs[shown]]
    table += [row(label + " @ half peak", r) for label, r in half.items()]
    table.append(row("muse, promotion during the run", swap))
    print()
    print(f"sweeps of round {shown + 1} of {args.rounds} (the round of the median ratio):")
    print_table(["server", "target req/s", "achieved req/s", "p50 us", "p99 us", "p99.9 us", "errors"], table)
    steady = half["muse /v1/score"]
    print(
        f"hot swap: p99 {swap['p99_us']:,.0f} us with a promotion (new library loaded) during the run, "
        f"{steady['p99_us']:,.0f} us steady: {swap['p99_us'] / steady['p99_us']:.2f}x; "
        f"{swap['errors']} failed requests"
    )
    print()
    print_table(
        ["round", "no-op peak req/s", "muse peak req/s", "muse / no-op"],
        [[n + 1, f"{o:,.0f}", f"{m:,.0f}", f"{r:.0%}"] for n, (o, m, r) in enumerate(zip(noop, muse, ratios))],
    )
    print(
        f"\npeak: muse {statistics.median(muse):,.0f} req/s, no-op {statistics.median(noop):,.0f} req/s "
        f"(medians of {args.rounds} rounds); median of the rounds' ratios: muse = {statistics.median(ratios):.0%} "
        f"of no-op"
    )


if __name__ == "__main__":
    main()
