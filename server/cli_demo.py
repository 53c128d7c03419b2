"""`muse demo`: the whole story on simulated data, from nothing, in a few minutes.

Each step runs the same `muse` command a user would type, and says so."""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import itertools
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import polars as pl

from muse.calib import AlertRateCurve, MapTable, ReferenceFile, alert_rates
from muse.calib.reference import encode_reference
from muse.core import simulate
from muse.core.registry import Registry
from muse.server import testing as local

REFERENCE = AlertRateCurve([0.2, 0.5, 0.6, 0.8], [0.70, 0.35, 0.10, 0.05])
REVIEW = AlertRateCurve([0.5, 0.9], [0.05, 0.01])
BETA_V1 = 0.1  # negatives kept at training
BETA_V2 = 0.25


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


def train_model(months, rows: int, path: pathlib.Path, seed: int, beta: float) -> None:
    import lightgbm as lgb

    parts = [simulate.generate_mix(m, rows, seed=seed) for m in months]
    X = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    Xs, ys = simulate.undersample(X, y, beta, seed=seed)
    params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.05, "min_data_in_leaf": 40,
              "feature_fraction": 0.9, "verbose": -1, "seed": seed, "num_threads": 2}
    ds = lgb.Dataset(Xs, ys, feature_name=simulate.FEATURES, categorical_feature=["merchant_category"])
    lgb.train(params, ds, num_boost_round=200).save_model(str(path))
    print(f"trained on months {months[0]}-{months[-1]}: {y.size} events, {int(y.sum())} frauds; "
          f"kept {ys.size} after keeping negatives with beta={beta}")


def cmd_demo(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    work: pathlib.Path = args.workdir
    if work.exists():
        shutil.rmtree(work)
    registry = work / "registry"
    reg = Registry(registry)
    reg.references_dir.mkdir(parents=True)
    rows = args.rows
    R = str(registry)

    step("1. Train model v1 on months 0-2 with negatives undersampled, and compile it")
    train_model([0, 1, 2], rows, work / "fraud_v1.txt", seed=1, beta=BETA_V1)
    run(["compile", str(work / "fraud_v1.txt"), "--registry", R, "--name", "fraud", "--beta", str(BETA_V1)])

    step("2. Declare each intent's reference distribution (alert rate at or above each edge)")
    reg.reference_path("fraud").write_bytes(encode_reference(ReferenceFile("fraud", REFERENCE, "card fraud")))
    reg.reference_path("review").write_bytes(encode_reference(ReferenceFile("review", REVIEW, "manual review")))
    print(reg.reference_path("fraud").read_text())

    step("3. Calibrate v1 per tenant on month 3 traffic, onto both references")
    X, _, tenants = simulate.generate_mix(3, rows, seed=7)
    model = reg.load_model("fraud")
    pl.DataFrame({"tenant": tenants, "margin": model.predict(X, margin=True)}).write_parquet(work / "month3.parquet")
    for name, ref in (("fraud", "fraud"), ("fraud-review", "review")):
        run(["calib", "fit", "--registry", R, "--model", "fraud/1", "--reference", ref, "--name", name,
             "--scores", str(work / "month3.parquet"), "--by", "tenant"])

    step("4. Deploy v1 for two intents (both predictors share one loaded copy), add tenant keys, serve")
    apply_deployment(work, R, "v1.toml", DEPLOY_V1)
    keys = {}
    for tenant in simulate.TENANTS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run(["keys", "add", "--registry", R, "--tenant", tenant])
        keys[tenant] = out.getvalue().strip().splitlines()[-1]
    port = local.free_port()
    print(f"$ muse serve --registry {R} --port {port} --score-log-flush-seconds 1")
    # The log flushes every second here (default 10 s) so the demo can fit from it without waiting.
    server = subprocess.Popen([sys.executable, "-m", "muse.server.cli", "serve", "--registry", R, "--port", str(port),
                               "--score-log-flush-seconds", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = DemoClient(port, keys)
        client.wait_generation(None)
        serve_and_compare(client, reg, work, rows, R)
    finally:
        server.terminate()  # SIGTERM: the server flushes its score log before exiting
        server.wait(30)
    step("11. Server stopped (SIGTERM) and its score log flushed: is any live calibration drifting?")
    run_status(R)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; registry in {registry}")


def serve_and_compare(client: "DemoClient", reg: Registry, work: pathlib.Path, rows: int, R: str) -> None:
    step("5. Month 4: every tenant scores over HTTP, on both intents")
    X4, y4, t4 = simulate.generate_mix(4, rows, seed=11)
    sample = {"tenant": t4[0], "intent": "fraud", "events": [{"id": "tx-1", "features": _features(X4[0])}]}
    print(f"POST /v1/score {json.dumps(sample)[:140]}...")
    print(f"  -> {json.dumps(client.score(sample)[1])}")
    started = time.perf_counter()
    fraud4 = client.score_all("fraud", X4, t4)
    review4 = client.score_all("review", X4, t4)
    elapsed = time.perf_counter() - started
    m = client.metrics()
    requests = sum(v for k, v in m.items() if k.startswith("muse_requests_total{"))
    calls = m.get('muse_batch_rows_count{model="fraud/1"}', 0)
    print(f"scored {2 * len(X4):,} events in {elapsed:.1f} s ({2 * len(X4) / elapsed:,.0f} events/s): {requests:,.0f} "
          f"requests of {BATCH} events, {CONCURRENCY} in flight, went out in {calls:,.0f} native calls")
    print_rates("fraud", REFERENCE, {"v1": fraud4.scores}, y4, t4)
    print_rates("review", REVIEW, {"v1": review4.scores}, y4, t4)

    step("6. Labels for month 4 arrive: train v2 on months 3-4 (a different keep-rate), compile it")
    train_model([3, 4], rows, work / "fraud_v2.txt", seed=2, beta=BETA_V2)
    run(["compile", str(work / "fraud_v2.txt"), "--registry", R, "--name", "fraud", "--beta", str(BETA_V2)])

    step("7. Deploy v2 as a shadow: it scores copies of live rows; callers still get v1")
    apply_deployment(work, R, "v2-shadow.toml", DEPLOY_V2_SHADOW)
    client.wait_generation(2)
    X5, _, t5 = simulate.generate_mix(5, rows, seed=13)
    fraud5 = client.score_all("fraud", X5, t5)
    print(f"month 5: {len(X5):,} events answered by {', '.join(sorted(set(fraud5.predictors)))}")
    dropped = client.metrics().get('muse_shadow_dropped_total{intent="fraud"}', 0)
    print(f"shadow work dropped because the shadow queue was full: {dropped:.0f} requests")
    log = wait_for_shadow_log(reg, expected=len(X5) - int(dropped) * BATCH)
    print(f"score log: {log.filter(pl.col('role') == 'shadow').height:,} shadow scores of fraud-v2 in "
          f"{len(list((reg.root / 'scorelog').glob('*.parquet')))} Parquet files")

    step("8. Fit v2's quantile maps from its shadow scores in the log, per tenant")
    run(["calib", "fit", "--registry", R, "--model", "fraud/2", "--reference", "fraud", "--name", "fraud",
         "--scores", str(reg.root / "scorelog"), "--predictor", "fraud-v2", "--by", "tenant"])
    apply_deployment(work, R, "v2-calibrated-shadow.toml", DEPLOY_V2_SHADOW.replace(
        'models = ["fraud/2"]', 'models = ["fraud/2"]\ncalibration = "fraud/2"'))
    client.wait_generation(3)

    step("9. Month 6 traffic flows; promote v2 in the middle of it")
    X6, y6, t6 = simulate.generate_mix(6, rows, seed=17)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("r", client.score_all("fraud", X6, t6)))
    client.done = 0
    runner.start()
    while client.done < client.jobs_total // 3:
        time.sleep(0.01)
    run(["promote", "fraud-v2", "--registry", R])
    runner.join()
    fraud6 = result["r"]
    by_pred = {p: int((fraud6.predictors == p).sum()) for p in sorted(set(fraud6.predictors))}
    print(f"month 6: {len(X6):,} events, {fraud6.failures} failed requests; answered by "
          + ", ".join(f"{p} ({n:,} events)" for p, n in by_pred.items()))

    step("10. Before and after, on the month-6 events v2 answered: same thresholds, same alert rates, more fraud caught")
    after = fraud6.predictors == "fraud-v2"
    v1 = offline_v1(reg, X6[after], t6[after])
    print_rates("fraud", REFERENCE, {"v1": v1, "v2": fraud6.scores[after]}, y6[after], t6[after], recall=True)
    print("(v1 here is the same library and maps the server used before, applied to the same events)")


def wait_for_shadow_log(reg: Registry, expected: int, timeout: float = 30) -> pl.DataFrame:
    """Shadow scoring runs behind the responses; wait until its rows reach the log."""
    deadline = time.monotonic() + timeout
    while True:
        log = pl.read_parquet(reg.root / "scorelog" / "*.parquet")
        if log.filter(pl.col("role") == "shadow").height >= expected or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


def offline_v1(reg: Registry, X: np.ndarray, tenants: np.ndarray) -> np.ndarray:
    model = reg.load_model("fraud/1")
    m = model.manifest
    names = reg.calibration_tenants("fraud/1")
    table = MapTable([reg.load_calibration("fraud/1", tenant=t).quantile_map() for t in names])
    index = np.array([names.index(t) for t in tenants])
    return table.calibrate(model.predict(X, margin=True), index, m.beta, m.margin_kind)[1]


def print_rates(intent: str, curve, scores: dict, y, tenants, recall: bool = False) -> None:
    print(f"intent {intent!r}: alert rate at each edge [target]" + ("; recall at each edge" if recall else ""))
    for tenant in simulate.TENANTS:
        sel = tenants == tenant
        for label, s in scores.items():
            rates = alert_rates(s[sel], curve.edges)
            line = f"  {tenant:<11} {label:<3} " + " ".join(
                f">={e:g}: {r:.3f} [{t:.2f}]" for e, r, t in zip(curve.edges, rates, curve.rates))
            if recall:
                frauds = max(int(y[sel].sum()), 1)
                line += "   recall " + " ".join(f"{((s[sel] >= e) & (y[sel] == 1)).sum() / frauds:.2f}"
                                              for e in curve.edges)
            print(line)


def run_status(R: str) -> None:
    from muse.server.cli import main

    print(f"$ muse calib status --registry {R}")
    main(["calib", "status", "--registry", R])


def apply_deployment(work: pathlib.Path, R: str, name: str, text: str) -> None:
    (work / name).write_text(text)
    run(["deploy", "apply", str(work / name), "--registry", R])


DEPLOY_V1 = """\
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
DEPLOY_V2_SHADOW = DEPLOY_V1.replace('active = "fraud-v1"', 'active = "fraud-v1"\nshadows = ["fraud-v2"]') + """
[[predictors]]
name = "fraud-v2"
version = "2"
intent = "fraud"
models = ["fraud/2"]
"""
BATCH = 64
CONCURRENCY = 8


def _features(row) -> list:
    return [None if np.isnan(v) else round(float(v), 6) for v in row]


class Scored:
    def __init__(self, n: int):
        self.scores = np.empty(n)
        self.predictors = np.empty(n, dtype=object)
        self.failures = 0


class DemoClient:
    """What tenants' services would do: POST batches of events, keep-alive, a few in flight."""

    def __init__(self, port: int, keys: dict):
        self.port = port
        self.keys = keys
        self._local = threading.local()
        self.done = 0
        self.jobs_total = 0

    def _call(self, method: str, path: str, body: bytes | None = None, key: str | None = None):
        if not hasattr(self._local, "conn"):
            self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            self._local.conn.request(method, path, body=body, headers=headers)
            resp = self._local.conn.getresponse()
            return resp.status, resp.read()
        except OSError:
            del self._local.conn
            raise

    def wait_generation(self, generation: int | None, timeout: float = 120) -> None:
        try:
            local.wait_for(self.port, generation=generation, timeout=timeout)
        except TimeoutError as exc:
            raise SystemExit(f"demo: {exc}") from None

    def score(self, payload: dict) -> tuple[int, dict]:
        status, body = self._call("POST", "/v1/score", json.dumps(payload).encode(), self.keys[payload["tenant"]])
        return status, json.loads(body)

    def score_all(self, intent: str, X: np.ndarray, tenants: np.ndarray) -> Scored:
        out = Scored(len(X))
        per_tenant = []
        for t in self.keys:
            idx = np.flatnonzero(tenants == t)
            per_tenant.append([(t, idx[i:i + BATCH]) for i in range(0, len(idx), BATCH)])
        jobs = [job for batch in itertools.zip_longest(*per_tenant) for job in batch if job]  # tenants interleave
        self.jobs_total = len(jobs)

        def one(job):
            tenant, idx = job
            status, body = self.score({"tenant": tenant, "intent": intent,
                                       "events": [{"features": _features(X[i])} for i in idx]})
            if status != 200:
                out.failures += 1
                raise SystemExit(f"demo: /v1/score answered {status}: {body}")
            out.scores[idx] = body["scores"]
            out.predictors[idx] = body["predictor"]
            self.done += 1

        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, jobs))
        return out

    def metrics(self) -> dict[str, float]:
        return local.scrape(self.port)
