"""Live model updates against a real two-worker server: shadows, the score log,
calibration from the log, promotion and rollback under load, refused
deployments, and a score log that survives SIGTERM."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import polars as pl
import pytest

from conftest import get_case
from muse.calib import correct_margins
from muse.core.deploy import DeploymentStore
from muse.core.spec import decode_spec
from muse.server.auth import add_key, keys_path
from muse.server.cli import main as cli
from servers import Server, as_json_rows, calibrate, make_registry, rows

V1_WITH_SHADOW = """
[[predictors]]
name = "fraud-v1"
version = "1"
intent = "fraud"
models = ["lightgbm/1"]
calibration = "lightgbm/1"

[[predictors]]
name = "fraud-v2"
version = "2"
intent = "fraud"
models = ["xgboost-json/1"]

[[routes]]
tenant = "*"
intent = "fraud"
active = "fraud-v1"
shadows = ["fraud-v2"]
"""
TENANTS = ("acme", "globex")


@pytest.fixture(scope="module")
def live(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("live")
    cases = {k: get_case(k, model_dir, root / "compiled") for k in ("lightgbm", "xgboost-json")}
    reg = make_registry(root / "registry", cases)
    calibrate(reg, "lightgbm", {})
    keys = {t: add_key(keys_path(reg.root), t, False)[1] for t in TENANTS}
    admin = add_key(keys_path(reg.root), None, True)[1]
    DeploymentStore(reg).apply(decode_spec(V1_WITH_SHADOW.encode(), "v1.toml"))
    server = Server(reg.root, "--workers", "2", "--score-log-flush-seconds", "0.5")
    server.wait_ready(generation=1)

    class Live:
        pass

    env = Live()
    env.reg, env.cases, env.keys, env.admin, env.server, env.root = reg, cases, keys, admin, server, root
    yield env
    server.stop()


def expected(env, predictor: str, X: np.ndarray) -> np.ndarray:
    """What each predictor of the test returns for X (all-traffic maps)."""
    if predictor == "fraud-v1":
        model = env.cases["lightgbm"].model
        qmap = env.reg.load_calibration("lightgbm/1").quantile_map()
        return qmap(correct_margins(model.predict(X, margin=True), model.manifest.beta))
    model = env.cases["xgboost-json"].model
    corrected = correct_margins(model.predict(X, margin=True), model.manifest.beta)
    if predictor == "fraud-v2":
        return corrected
    cal = env.reg.load_calibration("xgboost-json/1").quantile_map()  # fraud-v2c: calibrated from the log
    return cal(corrected)


def worker_generations(env) -> set[float]:
    return {v for k, v in env.server.metrics().items() if k.startswith("muse_deployment_generation{")}


def wait_converged(env, generation: int, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        gens = worker_generations(env)
        if gens == {generation}:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"workers did not converge on {generation}: {worker_generations(env)}")


class Load:
    """Clients of both tenants scoring continuously; every response is kept."""

    def __init__(self, env, clients: int = 4):
        self.env, self.stop_flag, self.responses, self.threads = env, threading.Event(), [], []
        for i in range(clients):
            t = threading.Thread(target=self.run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)

    def run(self, i: int) -> None:
        tenant = TENANTS[i % 2]
        n = 0
        while not self.stop_flag.is_set():
            X = rows(1 + n % 4, seed=1000 * i + n)
            payload = {"tenant": tenant, "intent": "fraud", "events": [{"features": r} for r in as_json_rows(X)]}
            status, body, _ = self.env.server.post("/v1/score", payload, self.env.keys[tenant])
            self.responses.append((status, body, X))
            n += 1

    def finish(self) -> list:
        self.stop_flag.set()
        for t in self.threads:
            t.join(30)
        return self.responses


def check_responses(env, responses, generation_predictor: dict[int, str]) -> None:
    failed = [(s, b) for s, b, _ in responses if s != 200]
    assert not failed, failed[:3]
    for _, body, X in responses:
        predictor = generation_predictor[body["generation"]]  # a generation serves exactly one predictor here
        assert body["predictor"] == predictor, body
        np.testing.assert_allclose(body["scores"], expected(env, predictor, X), rtol=1e-12, atol=1e-15)


def test_1_shadow_scores_are_logged_but_never_returned(live):
    load = Load(live)
    time.sleep(1.5)
    responses = load.finish()
    check_responses(live, responses, {1: "fraud-v1"})
    time.sleep(1.2)  # the log flushes every 0.5 s
    log = pl.read_parquet(live.reg.root / "scorelog" / "*.parquet")
    shadow = log.filter(pl.col("role") == "shadow")
    assert set(shadow["predictor"].unique()) == {"fraud-v2"} and set(shadow["tenant"].unique()) == set(TENANTS)
    active_rows = log.filter(pl.col("role") == "active").height
    assert active_rows == sum(len(X) for _, _, X in responses)
    assert shadow.height + int(live.server.metrics().get('muse_shadow_dropped_total{intent="fraud"}', 0)) \
        == active_rows


def test_2_calibrate_shadow_from_log_then_promote_and_roll_back_under_load(live, tmp_path):
    # Enough shadow traffic to fit a map per tenant.
    for tenant in TENANTS:
        for seed in range(3):
            X = rows(400, seed=500 + seed)
            payload = {"tenant": tenant, "intent": "fraud", "events": [{"features": r} for r in as_json_rows(X)]}
            assert live.server.post("/v1/score", payload, live.keys[tenant])[0] == 200
    time.sleep(1.5)
    assert cli(["calib", "fit", "--registry", str(live.reg.root), "--model", "xgboost-json/1", "--reference", "fraud",
                "--scores", str(live.reg.root / "scorelog"), "--predictor", "fraud-v2", "--min-samples", "500"]) == 0
    v2c = V1_WITH_SHADOW.replace('shadows = ["fraud-v2"]', 'shadows = ["fraud-v2c"]') + """
[[predictors]]
name = "fraud-v2c"
version = "2"
intent = "fraud"
models = ["xgboost-json/1"]
calibration = "xgboost-json/1"
"""
    (tmp_path / "v2c.toml").write_text(v2c)
    assert cli(["deploy", "apply", str(tmp_path / "v2c.toml"), "--registry", str(live.reg.root)]) == 0
    wait_converged(live, 2)

    load = Load(live)
    time.sleep(0.7)
    assert cli(["promote", "fraud-v2c", "--registry", str(live.reg.root)]) == 0
    converge_promote = wait_converged(live, 3)
    time.sleep(0.7)
    status, body, _ = live.server.post("/admin/rollback", {}, live.admin)  # the same through the admin API
    assert status == 200 and body["generation"] == 4 and "rollback to generation 2" in body["description"]
    converge_rollback = wait_converged(live, 4)
    time.sleep(0.7)
    responses = load.finish()
    check_responses(live, responses, {2: "fraud-v1", 3: "fraud-v2c", 4: "fraud-v1"})
    served = {body["generation"] for _, body, _ in responses}
    assert served >= {2, 3, 4}, served
    print(f"two workers converged {converge_promote * 1e3:.0f} ms after promote, "
          f"{converge_rollback * 1e3:.0f} ms after rollback")  # shown with pytest -s
    assert converge_promote < 5 and converge_rollback < 5
    spec = DeploymentStore(live.reg).read(3)
    assert spec.routes[0].active == "fraud-v2c" and spec.routes[0].shadows == []


def test_3_broken_deployment_refused_while_serving_continues(live):
    store = DeploymentStore(live.reg)
    before = store.current_generation()
    # A library that no longer matches its manifest, published without validation (as a bad copy would be).
    broken = live.reg.models_dir / "broken" / "1"
    broken.mkdir(parents=True)
    source = live.reg.model_dir("lightgbm", "1")
    for f in source.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    lib = next(broken.glob("*.so"))
    lib.write_bytes(lib.read_bytes()[:-64] + b"\0" * 64)
    spec = decode_spec(V1_WITH_SHADOW.replace('models = ["lightgbm/1"]', 'models = ["broken/1"]')
                       .replace('calibration = "lightgbm/1"\n', "").encode(), "broken.toml")
    with pytest.raises(Exception, match="sha256"):
        store.apply(spec)  # the CLI path refuses it outright
    bad_generation = store.publish(spec)  # pretend it slipped through
    time.sleep(1.0)
    assert worker_generations(live) == {float(before)}
    status, body, _ = live.server.get("/admin/deployment", live.admin)
    assert body["generation"] == before and f"generation {bad_generation}" in body["refused"]
    assert "sha256" in body["refused"]
    X = rows(3, seed=77)
    payload = {"tenant": "acme", "intent": "fraud", "events": [{"features": r} for r in as_json_rows(X)]}
    status, body, _ = live.server.post("/v1/score", payload, live.keys["acme"])
    assert status == 200 and body["generation"] == before
    assert live.server.metrics()["muse_deployment_failures_total"] >= 1
    # The admin API refuses it with the entry named and publishes nothing.
    status, body, _ = live.server.post("/admin/deployment", V1_WITH_SHADOW.replace("lightgbm/1", "nope/1").encode(),
                                       live.admin, headers={"Content-Type": "application/toml"})
    assert status == 422 and "predictors[0] (fraud-v1): model nope/1" in body["error"]
    assert store.current_generation() == bad_generation
    store.rollback(before)  # leave a served generation current for the next test
    wait_converged(live, bad_generation + 1)


def test_4_drift_gauges_and_calib_status(live, capsys):
    metrics = live.server.metrics()
    rate = [k for k in metrics if k.startswith("muse_alert_rate{") and 'edge="0.5"' in k and "acme" in k]
    assert rate and 0.0 <= metrics[rate[0]] <= 1.0
    targets = {v for k, v in metrics.items() if k.startswith('muse_alert_rate_target{edge="0.5",intent="fraud"')}
    assert targets == {0.35}  # one series per worker process
    code = cli(["calib", "status", "--registry", str(live.reg.root), "--min-samples", "100"])
    out = capsys.readouterr().out
    assert code in (0, 1) and "fraud-v1" in out and "active" in out and ">= 0.5" in out
    assert ("DRIFTED" in out) == (code == 1)


def test_5_score_log_readable_after_sigterm(live):
    X = rows(5, seed=99)
    payload = {"tenant": "globex", "intent": "fraud", "events": [{"id": 1, "features": r} for r in as_json_rows(X)]}
    assert live.server.post("/v1/score", payload, live.keys["globex"])[0] == 200
    marker = live.server.post("/v1/score", payload, live.keys["globex"])[1]
    live.server.stop()  # SIGTERM, right after the last request: before any timed flush
    log = pl.read_parquet(live.reg.root / "scorelog" / "*.parquet")
    last = log.filter((pl.col("generation") == marker["generation"]) & (pl.col("tenant") == "globex")
                      & (pl.col("role") == "active")).sort("time").tail(5)
    np.testing.assert_allclose(last["mapped"].to_numpy(), marker["scores"], rtol=1e-12)
    assert not list((live.reg.root / "scorelog").glob(".*.tmp"))


def test_shadow_overflow_is_counted_not_blocking():
    from muse.core.registry import Registry
    from muse.core.snapshot import Route
    from muse.server.metrics import Metrics
    from muse.server.serving import Serving

    # A Serving whose shadow worker is not running: the queue can only fill.
    async def fill():
        metrics = Metrics()
        serving = Serving(Registry("/nonexistent"), metrics, shadow_queue=2)
        serving._shadows = asyncio.Queue(2)
        route = Route("*", "fraud", active=None, shadows=("s1", "s2"))
        started = time.perf_counter()
        for _ in range(5):
            serving.shadow(route, np.zeros((1, 3)), "acme", 1)
        elapsed = time.perf_counter() - started
        return metrics, serving, elapsed

    metrics, serving, elapsed = asyncio.run(fill())
    assert serving._shadows.qsize() == 2
    assert metrics.shadow_dropped.labels("fraud")._value.get() == 8
    assert elapsed < 0.5  # never waits for room
