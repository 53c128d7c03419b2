"""`muse demo`: the whole story on simulated data, from nothing, in a few minutes.

Each step runs the same `muse` command a user would type, and says so."""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import io
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import polars as pl

from muse.calib import AlertRateCurve, ReferenceFile, alert_rates
from muse.calib.reference import encode_reference
from muse.core import simulate
from muse.core.registry import Registry

REFERENCE = AlertRateCurve([0.2, 0.5, 0.6, 0.8], [0.70, 0.35, 0.10, 0.05])
REVIEW = AlertRateCurve([0.5, 0.9], [0.05, 0.01])
BETA = 0.1  # negatives kept at training


def register(sub) -> None:
    p = sub.add_parser("demo", help="train, compile, calibrate, deploy and serve built-in simulated data")
    p.add_argument("--workdir", default="demo-out", type=pathlib.Path)
    p.add_argument("--rows", type=int, default=40_000, help="events per tenant per month")
    p.set_defaults(func=cmd_demo)


def step(title: str) -> None:
    print(f"\n== {title}")


def run(argv: list[str]) -> None:
    from muse.server.cli import main

    print("$ muse " + " ".join(argv))
    if main(argv) != 0:
        raise SystemExit(f"demo step failed: muse {' '.join(argv)}")


def train_model(months, rows: int, path: pathlib.Path, seed: int) -> None:
    import lightgbm as lgb

    parts = [simulate.generate_mix(m, rows, seed=seed) for m in months]
    X = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    Xs, ys = simulate.undersample(X, y, BETA, seed=seed)
    params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.05, "min_data_in_leaf": 40,
              "feature_fraction": 0.9, "verbose": -1, "seed": seed, "num_threads": 2}
    ds = lgb.Dataset(Xs, ys, feature_name=simulate.FEATURES, categorical_feature=["merchant_category"])
    lgb.train(params, ds, num_boost_round=200).save_model(str(path))
    print(f"trained on months {months[0]}-{months[-1]}: {y.size} events, {int(y.sum())} frauds; "
          f"kept {ys.size} after keeping negatives with beta={BETA}")


def cmd_demo(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    work: pathlib.Path = args.workdir
    if work.exists():
        shutil.rmtree(work)
    registry = work / "registry"
    reg = Registry(registry)
    reg.references_dir.mkdir(parents=True)
    rows = args.rows

    step("1. Train model v1 on months 0-2 with negatives undersampled")
    train_model([0, 1, 2], rows, work / "fraud_v1.txt", seed=1)

    step("2. Compile it into a native artifact")
    run(["compile", str(work / "fraud_v1.txt"), "--registry", str(registry), "--name", "fraud", "--beta", str(BETA)])

    step("3. Declare the intent's reference distribution (alert rate at or above each edge)")
    reg.reference_path("fraud").write_bytes(encode_reference(ReferenceFile("fraud", REFERENCE, "card fraud")))
    print(reg.reference_path("fraud").read_text())

    step("4. Calibrate v1 on month 3 traffic, per tenant")
    X, _, tenants = simulate.generate_mix(3, rows, seed=7)
    model = reg.load_model("fraud")
    frame = pl.DataFrame({"tenant": tenants, "margin": model.predict(X, margin=True)})
    frame.write_parquet(work / "month3_scores.parquet")
    run(["calib", "fit", "--registry", str(registry), "--model", "fraud", "--reference", "fraud",
         "--scores", str(work / "month3_scores.parquet"), "--by", "tenant"])

    step("5. A second intent on the same model: a manual-review queue with its own reference")
    reg.reference_path("review").write_bytes(encode_reference(ReferenceFile("review", REVIEW, "manual review")))
    run(["calib", "fit", "--registry", str(registry), "--model", "fraud", "--reference", "review",
         "--scores", str(work / "month3_scores.parquet"), "--by", "tenant", "--name", "fraud-review"])

    step("6. Deploy: two predictors share one loaded copy of the model")
    (work / "deployment.toml").write_text(DEPLOYMENT)
    print(DEPLOYMENT)
    run(["deploy", "apply", str(work / "deployment.toml"), "--registry", str(registry)])
    keys = {}
    for tenant in simulate.TENANTS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run(["keys", "add", "--registry", str(registry), "--tenant", tenant])
        keys[tenant] = out.getvalue().strip().splitlines()[-1]

    step("7. Serve it: muse serve, then month 4 traffic from every tenant over HTTP")
    port = _free_port()
    print(f"$ muse serve --registry {registry} --port {port}")
    server = subprocess.Popen([sys.executable, "-m", "muse.server.cli", "serve", "--registry", str(registry),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = DemoClient(port)
        client.wait_ready()
        X4, y4, t4 = simulate.generate_mix(4, rows, seed=11)
        sample = {"tenant": t4[0], "intent": "fraud", "events": [{"id": "tx-1", "features": _features(X4[0])}]}
        print(f"POST /v1/score {json.dumps(sample)[:150]}...")
        print(f"  -> {json.dumps(client.score(keys[t4[0]], sample))}")
        scores = {}
        started = time.perf_counter()
        for intent in ("fraud", "review"):
            scores[intent] = client.score_all(keys, intent, X4, t4)
        elapsed = time.perf_counter() - started
        print(f"scored {2 * len(X4):,} events in {elapsed:.1f} s over HTTP ({2 * len(X4) / elapsed:,.0f} events/s, "
              f"requests of {BATCH} events, {CONCURRENCY} concurrent)")
        metrics = client.metrics()
        batches = metrics.get('muse_batch_rows_count{model="fraud/1"}', 0)
        batched = metrics.get('muse_batch_rows_sum{model="fraud/1"}', 0)
        requests = sum(v for k, v in metrics.items() if k.startswith("muse_requests_total{"))
        print(f"the server answered {requests:,.0f} requests with {batches:,.0f} native calls "
              f"({batched / max(batches, 1):.0f} rows per call): concurrent requests of every tenant and both "
              "intents share calls of the one loaded model")
    finally:
        server.terminate()
        server.wait(15)

    for intent, curve in (("fraud", REFERENCE), ("review", REVIEW)):
        step(f"8. Intent {intent!r}: alert rate at each reference edge on month 4, per tenant [target]")
        print(f"{'tenant':<12} " + " ".join(f"{'>= ' + format(e, 'g'):>15}" for e in curve.edges))
        for t in simulate.TENANTS:
            rates = alert_rates(scores[intent][t4 == t], curve.edges)
            print(f"{t:<12} " + " ".join(f"{r:>7.3f} [{target:.3f}]" for r, target in zip(rates, curve.rates)))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; registry in {registry}")


DEPLOYMENT = """\
[[predictors]]
name = "fraud-v1"
version = "1"
intent = "fraud"
models = ["fraud/1"]
calibration = "fraud/1"

[[predictors]]
name = "review-v1"
version = "1"
intent = "review"
models = ["fraud/1"]
calibration = "fraud-review/1"

[[routes]]
tenant = "*"
intent = "fraud"
active = "fraud-v1"

[[routes]]
tenant = "*"
intent = "review"
active = "review-v1"
"""
BATCH = 64
CONCURRENCY = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _features(row) -> list:
    return [None if np.isnan(v) else round(float(v), 6) for v in row]


class DemoClient:
    """What a tenant's service would do: POST batches of events, keep-alive, a few in flight."""

    def __init__(self, port: int):
        self.port = port
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        if not hasattr(self._local, "conn"):
            self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return self._local.conn

    def _call(self, method: str, path: str, body: bytes | None = None, key: str | None = None):
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn = self._conn()
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._call("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                self._local.__dict__.clear()
            time.sleep(0.2)
        raise SystemExit("demo: the server did not become ready")

    def score(self, key: str, payload: dict) -> dict:
        status, body = self._call("POST", "/v1/score", json.dumps(payload).encode(), key)
        if status != 200:
            raise SystemExit(f"demo: /v1/score answered {status}: {body[:300]!r}")
        return json.loads(body)

    def score_all(self, keys: dict, intent: str, X: np.ndarray, tenants: np.ndarray) -> np.ndarray:
        out = np.empty(len(X))
        jobs = []
        for t in keys:
            idx = np.flatnonzero(tenants == t)
            jobs += [(t, idx[i:i + BATCH]) for i in range(0, len(idx), BATCH)]

        def one(job):
            tenant, idx = job
            events = [{"features": _features(X[i])} for i in idx]
            out[idx] = self.score(keys[tenant], {"tenant": tenant, "intent": intent, "events": events})["scores"]

        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, jobs))
        return out

    def metrics(self) -> dict[str, float]:
        _, raw = self._call("GET", "/metrics")
        samples = {}
        for line in raw.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples
