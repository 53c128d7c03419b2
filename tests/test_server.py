"""The scoring server over real HTTP on loopback: one `muse serve` process for
the module, started before anything is deployed."""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time

import numpy as np
import pytest
from conftest import get_case
from helpers import calibrate, make_registry, rows

from muse.calib import correct_margins
from muse.core.spec import BatchingSpec, DeploymentSpec, PredictorSpec, RouteSpec, encode_spec
from muse.server.auth import add_key, keys_path
from muse.server.cli import main as cli
from muse.server.testing import LocalServer, as_json_rows, wait_until

DEPLOYMENT = DeploymentSpec(
    predictors=[
        PredictorSpec("fraud-lgb", "1", "fraud", ["lightgbm/1"], calibration="lightgbm/1"),
        PredictorSpec("fraud-xgb", "1", "fraud", ["xgboost-json/1"]),
        PredictorSpec("fraud-xgb-solo", "1", "fraud", ["xgboost-json/1"]),  # hooli's shadow only
        PredictorSpec("risk-xgb", "3", "risk", ["xgboost-json/1"]),
        PredictorSpec("slow", "1", "slow", ["sklearn-hgb/1"]),
    ],
    routes=[
        RouteSpec("*", "fraud", "fraud-lgb"),
        RouteSpec("acme", "fraud", "fraud-lgb", shadows=["fraud-xgb"]),
        RouteSpec("hooli", "fraud", "fraud-lgb", shadows=["fraud-xgb-solo"]),
        RouteSpec("globex", "risk", "risk-xgb"),
        RouteSpec("*", "slow", "slow"),
    ],
    batching={
        "lightgbm/1": BatchingSpec(max_wait_us=2000),  # lingers so that concurrent requests visibly coalesce
        # holds its queue (100 ms, the most allowed) so that it overflows on purpose: see test_overload_...
        "sklearn-hgb/1": BatchingSpec(max_rows=1000, max_wait_us=100_000, max_queue_rows=4),
    },
)
TENANTS = {"acme": 1, "globex": 2}


class Env:
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("served")
    reg_dir = root / "registry"
    cases = {k: get_case(k, model_dir, root / "compiled") for k in ("lightgbm", "xgboost-json", "sklearn-hgb")}
    reg = make_registry(reg_dir, cases)
    calibrate(reg, "lightgbm", TENANTS)
    e = Env()
    e.reg, e.cases = reg, cases
    e.keys = {t: add_key(keys_path(reg_dir), t, False)[1] for t in ("acme", "globex", "initech", "hooli")}
    e.admin = add_key(keys_path(reg_dir), None, True)[1]
    e.server = LocalServer(reg_dir, "--max-body-bytes", "200000")
    try:
        e.before_deploy = (
            e.server.get("/v2/health/ready")[0],
            e.server.post(
                "/v1/score", {"tenant": "acme", "intent": "fraud", "events": [{"features": [0.0] * 6}]}, e.keys["acme"]
            ),
        )
        (root / "deploy.toml").write_bytes(encode_spec(DEPLOYMENT))
        assert cli(["deploy", "apply", str(root / "deploy.toml"), "--registry", str(reg_dir)]) == 0
        e.server.wait_ready(generation=1)
        yield e
    finally:
        e.server.stop()


def expected_fraud(env, X, tenant):
    model = env.cases["lightgbm"].model
    cal_tenant = tenant if tenant in TENANTS else None
    qmap = env.reg.load_calibration("lightgbm", tenant=cal_tenant).quantile_map()
    return qmap(correct_margins(model.predict(X, margin=True), model.manifest.beta))


def score(env, tenant, X, intent="fraud", key=None, **extra):
    payload = {"tenant": tenant, "intent": intent, "events": [{"features": r} for r in as_json_rows(X)], **extra}
    return env.server.post("/v1/score", payload, key or env.keys[tenant])


def test_not_ready_until_deployed_then_ready(env):
    ready_status, (score_status, body, headers) = env.before_deploy
    assert ready_status == 503 and score_status == 503
    assert "no deployment" in body["error"] and headers["retry-after"] == "1"
    status, body, _ = env.server.get("/v2/health/ready")
    assert status == 200 and body == {"ready": True, "generation": 1}


def test_scores_match_offline_predictor_per_tenant(env):
    X = rows(40, seed=3)
    for tenant in ("acme", "globex", "initech"):
        status, body, _ = score(env, tenant, X)
        assert status == 200, body
        assert (body["predictor"], body["version"], body["generation"]) == ("fraud-lgb", "1", 1)
        np.testing.assert_allclose(body["scores"], expected_fraud(env, X, tenant), rtol=1e-12, atol=1e-15)
    # per-tenant maps differ, so the same rows score differently per tenant
    a = score(env, "acme", X)[1]["scores"]
    g = score(env, "globex", X)[1]["scores"]
    assert a != g


def test_features_by_name_and_ids(env):
    names = env.cases["lightgbm"].model.manifest.feature_names
    X = rows(3, seed=4)
    events = [
        {"id": f"tx-{i}", "features": {n: (None if np.isnan(v) else v) for n, v in zip(names, row)}}
        for i, row in enumerate(X)
    ]
    status, body, _ = env.server.post(
        "/v1/score", {"tenant": "acme", "intent": "fraud", "events": events}, env.keys["acme"]
    )
    assert status == 200, body
    assert body["ids"] == ["tx-0", "tx-1", "tx-2"]
    np.testing.assert_allclose(body["scores"], expected_fraud(env, X, "acme"), rtol=1e-12)


def test_concurrent_tenants_coalesce_and_match(env):
    before = env.server.metrics()
    jobs = [(t, rows(1 + i % 3, seed=50 + i)) for i, t in enumerate(["acme", "globex", "initech"] * 20)]
    bad = {"tenant": "acme", "intent": "fraud", "events": [{"features": [1.0, 2.0]}]}

    def run(job):
        tenant, X = job
        env.server.post("/v1/score", bad, env.keys["acme"])  # client mistakes interleaved: must not disturb others
        return score(env, tenant, X)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run, jobs))
    for (tenant, X), (status, body, _) in zip(jobs, results):
        assert status == 200, body
        np.testing.assert_allclose(body["scores"], expected_fraud(env, X, tenant), rtol=1e-12, atol=1e-15)
    after = env.server.metrics()
    key = 'muse_batch_rows_count{model="lightgbm/1"}'
    batches = after[key] - before.get(key, 0)
    total_rows = after[key.replace("_count", "_sum")] - before.get(key.replace("_count", "_sum"), 0)
    assert total_rows == sum(len(X) for _, X in jobs)
    assert batches < len(jobs), "rows of concurrent requests should share native calls"
    ok = 'muse_requests_total{code="200",intent="fraud",predictor="fraud-lgb",tenant="globex"}'
    assert after[ok] - before.get(ok, 0) == 20
    err = 'muse_request_errors_total{intent="fraud",predictor="fraud-lgb",reason="invalid",tenant="acme"}'
    assert after[err] - before.get(err, 0) == 60
    assert (
        'muse_request_duration_seconds_bucket{intent="fraud",le="0.005",predictor="fraud-lgb",tenant="acme"}' in after
    )


def test_shadow_scored_off_path_and_counted(env):
    """hooli's route is the only one with shadow fraud-xgb-solo: its counter moves with this test only."""
    key = 'muse_shadow_events_scored_total{intent="fraud",predictor="fraud-xgb-solo"}'
    X = rows(7, seed=9)
    status, body, _ = score(env, "hooli", X)
    assert status == 200 and body["predictor"] == "fraud-lgb"  # the caller sees only the active predictor
    np.testing.assert_allclose(body["scores"], expected_fraud(env, X, "hooli"), rtol=1e-12)
    wait_until(lambda: env.server.metrics().get(key, 0) >= 7, 10, "7 rows scored by the shadow")
    assert env.server.metrics()[key] == 7
    assert env.server.metrics().get('muse_shadow_dropped_total{intent="fraud"}', 0) == 0


def test_uncalibrated_predictor_serves_corrected_scores(env):
    X = rows(5, seed=5)
    status, body, _ = score(env, "globex", X, intent="risk")
    assert status == 200 and body["version"] == "3"
    model = env.cases["xgboost-json"].model
    np.testing.assert_allclose(
        body["scores"], correct_margins(model.predict(X, margin=True), model.manifest.beta), rtol=1e-12
    )


@pytest.mark.parametrize(
    "payload, status, field",
    [
        (b"{not json", 400, "$"),
        ({"tenant": 5, "intent": "fraud", "events": [{"features": [0.0] * 6}]}, 422, "$.tenant"),
        ({"tenant": "acme", "events": [{"features": [0.0] * 6}]}, 422, "$.intent"),
        ({"tenant": "acme", "intent": "fraud", "events": []}, 422, "$.events"),
        (
            {"tenant": "acme", "intent": "fraud", "events": [{"features": [0.0] * 6}, {"features": [0.0] * 5}]},
            422,
            "$.events[1].features",
        ),
        (
            {"tenant": "acme", "intent": "fraud", "events": [{"features": [0.0] * 5 + ["x"]}]},
            422,
            "$.events[0].features[5]",
        ),
        (
            {"tenant": "acme", "intent": "fraud", "events": [{"features": {"bogus": 1.0}}]},
            422,
            "$.events[0].features.bogus",
        ),
        (
            {"tenant": "acme", "intent": "fraud", "events": [{"features": {"Column_0": 1.0}}]},
            422,
            "$.events[0].features.Column_1",
        ),
        ({"tenant": "acme", "intent": "fraud", "events": [{"features": [0.0] * 6}], "extra": 1}, 422, "$"),
        ({"tenant": "acme", "intent": "nope", "events": [{"features": [0.0] * 6}]}, 404, "$.intent"),
        ({"tenant": "acme", "intent": "risk", "events": [{"features": [0.0] * 6}]}, 404, "$.tenant"),
        ({"tenant": "globex", "intent": "fraud", "events": [{"features": [0.0] * 6}]}, 403, "$.tenant"),
    ],
)
def test_client_errors_name_the_field(env, payload, status, field):
    got, body, _ = env.server.post("/v1/score", payload, env.keys["acme"])
    assert (got, body.get("field")) == (status, field), body
    assert body["error"]


def test_credentials(env):
    payload = {"tenant": "acme", "intent": "fraud", "events": [{"features": [0.0] * 6}]}
    assert env.server.post("/v1/score", payload)[0] == 401
    status, body, headers = env.server.post("/v1/score", payload, "muse_00000000_wrong")
    assert status == 401 and body["field"] == "authorization" and headers["www-authenticate"] == "Bearer"
    key = env.keys["acme"]
    assert env.server.post("/v1/score", payload, key[:-1] + ("x" if key[-1] != "x" else "y"))[0] == 401
    assert env.server.post("/v1/score", payload, headers={"X-API-Key": env.keys["acme"]})[0] == 200
    assert env.server.post("/v1/score", payload, env.admin)[0] == 200  # admin may score any tenant
    assert env.server.get("/admin/deployment", env.keys["acme"])[0] == 403
    status, body, _ = env.server.get("/admin/deployment", env.admin)
    assert status == 200 and body["generation"] == 1 and len(body["deployment"]["routes"]) == len(DEPLOYMENT.routes)


def test_keys_added_and_revoked_while_serving(env):
    from muse.server.auth import revoke_key

    path = keys_path(env.reg.root)
    record, key = add_key(path, "acme", False)
    payload = {"tenant": "acme", "intent": "fraud", "events": [{"features": [0.0] * 6}]}
    wait_for_status(env, payload, key, 200)
    revoke_key(path, record.id)
    wait_for_status(env, payload, key, 401)


def wait_for_status(env, payload, key, status, timeout=5.0):
    """Until a request with ``key`` is answered ``status`` (keys are reloaded at every poll)."""
    wait_until(lambda: env.server.post("/v1/score", payload, key)[0] == status, timeout, f"status {status}")


def test_compressed_bodies(env):
    import gzip

    payload = json.dumps({"tenant": "acme", "intent": "fraud", "events": [{"features": [0.0] * 6}]}).encode()
    gz = {"Content-Encoding": "gzip"}
    assert env.server.post("/v1/score", gzip.compress(payload), env.keys["acme"], headers=gz)[0] == 200
    status, body, _ = env.server.post("/v1/score", b"not gzip", env.keys["acme"], headers=gz)
    assert status == 400 and body["field"] == "content-encoding"
    status, body, _ = env.server.post("/v1/score", payload, env.keys["acme"], headers={"Content-Encoding": "br"})
    assert status == 415 and body["field"] == "content-encoding"
    bomb = gzip.compress(b"[" + b"0," * 300_000 + b"0]")  # small on the wire, 600 kB inflated
    assert len(bomb) < 200_000 and env.server.post("/v1/score", bomb, env.keys["acme"], headers=gz)[0] == 413


def test_bodies_in_pieces_and_chunked_on_one_connection(env):
    """A body is complete at content-length bytes (the server does not wait for Granian's
    end-of-body message): one sent in two pieces, one chunked (no length), then a plain one, all on
    one keep-alive connection, score alike."""
    import http.client

    payload = json.dumps({"tenant": "acme", "intent": "fraud", "events": [{"features": as_json_rows(rows(1, 9))[0]}]})
    raw = payload.encode()
    auth = {"Authorization": f"Bearer {env.keys['acme']}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", env.server.port, timeout=10)

    def answer():
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    def in_two_pieces():
        conn.putrequest("POST", "/v1/score")
        for k, v in {**auth, "Content-Length": str(len(raw))}.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(raw[:40])
        # Not a wait for a state: a pause between two sends, so that the rest of the body arrives
        # as a second TCP segment (a second body chunk for the server), which is what is tested.
        time.sleep(0.05)
        conn.send(raw[40:])
        return answer()

    def post(body, **kwargs):
        conn.request("POST", "/v1/score", body=body, headers=auth, **kwargs)
        return answer()

    try:
        results = [in_two_pieces(), post(iter([raw[:30], raw[30:]]), encode_chunked=True), post(raw)]
    finally:
        conn.close()
    assert [status for status, _ in results] == [200, 200, 200], results
    assert results[0][1]["scores"] == results[1][1]["scores"] == results[2][1]["scores"]


def test_oversized_body_is_413(env):
    big = {"tenant": "acme", "intent": "fraud", "events": [{"features": [0.123456789] * 6}] * 5000}
    status, body, _ = env.server.post("/v1/score", big, env.keys["acme"])
    assert status == 413 and "limit" in body["error"]
    assert score(env, "acme", rows(1, seed=1))[0] == 200


def test_overload_is_503_with_retry_after(env):
    """The 'slow' model lingers 100 ms for a fuller batch and queues at most 4 rows: of 3-row requests
    sent together, all but the first to arrive find the queue full.  Each round releases four at once;
    a round whose requests the machine spread over more than 100 ms could see no 503, so rounds are
    repeated until one does (in practice the first)."""
    payload = {"tenant": "acme", "intent": "slow", "events": [{"features": [0.0] * 6}] * 3}
    rounds = []

    def one_round():
        start = threading.Barrier(4)

        def post():
            start.wait()
            return env.server.post("/v1/score", payload, env.keys["acme"])

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: post(), range(4)))
        rounds.append(results)
        return any(status == 503 for status, _, _ in results)

    wait_until(one_round, 30, "a 503 from the full queue")
    results = rounds[-1]
    assert {status for status, _, _ in results} == {200, 503}, [r[:2] for r in results]
    for status, body, headers in results:
        if status == 503:
            assert headers["retry-after"] == "1" and "overloaded" in body["error"], body
        else:
            assert body["predictor"] == "slow" and len(body["scores"]) == 3, body
    assert all(status in (200, 503) for r in rounds for status, _, _ in r)
    assert score(env, "acme", rows(3, seed=2), intent="slow")[0] == 200  # and it recovers


def test_routing_errors(env):
    assert env.server.get("/nowhere")[0] == 404
    status, body, headers = env.server.request("DELETE", "/v1/score")
    assert status == 405 and headers["allow"] == "POST" and "allowed: POST" in body["error"]
    assert env.server.request("PUT", "/metrics")[2]["allow"] == "GET, HEAD"
    assert env.server.get("/v1/score")[0] == 405
    assert env.server.get("/v2/models/fraud/infer")[0] == 405
    assert env.server.request("TRACE", "/v2/models/fraud/ready")[0] == 405
    assert env.server.get("/v2/models/nope", env.keys["acme"])[0] == 404


def test_openapi_and_metadata(env):
    status, doc, _ = env.server.get("/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert "/v1/score" in doc["paths"] and "ScoreRequest" in doc["components"]["schemas"]
    status, meta, _ = env.server.get("/v2/models/fraud", env.keys["acme"])
    assert status == 200 and meta["inputs"][0]["shape"] == [-1, 6] and meta["versions"] == ["1"]


# -- Open Inference Protocol, driven by tritonclient ---------------------------------------


def test_tritonclient_end_to_end(env):
    import tritonclient.http as httpclient  # a dev dependency: missing, the test fails rather than skips

    client = httpclient.InferenceServerClient(f"127.0.0.1:{env.server.port}")
    auth = {"Authorization": f"Bearer {env.keys['acme']}"}
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fraud", headers=auth)
    meta = client.get_model_metadata("fraud", headers=auth)
    assert meta["name"] == "fraud" and meta["outputs"][0]["name"] == "score"
    X = rows(9, seed=12)
    assert np.isnan(X).any()
    for dtype, binary in [(np.float64, True), (np.float64, False), (np.float32, True), (np.float32, False)]:
        tensor = httpclient.InferInput("features", list(X.shape), "FP64" if dtype == np.float64 else "FP32")
        # JSON has no NaN: tritonclient sends missing values as binary data (null it cannot write)
        data = X if binary else np.nan_to_num(X, nan=0.5)
        tensor.set_data_from_numpy(data.astype(dtype), binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("score", binary_data=binary)]
        result = client.infer(
            "fraud", [tensor], outputs=outputs, headers=dict(auth), request_id="r1"
        )  # it writes into headers
        expected = expected_fraud(env, data.astype(dtype).astype(np.float64), "acme")
        np.testing.assert_allclose(result.as_numpy("score"), expected, rtol=1e-12)
        assert result.get_response()["model_version"] == "1"
    for algorithm in ("gzip", "deflate"):
        tensor = httpclient.InferInput("features", list(X.shape), "FP64")
        tensor.set_data_from_numpy(X)
        result = client.infer(
            "fraud",
            [tensor],
            headers=dict(auth),
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_allclose(result.as_numpy("score"), expected_fraud(env, X, "acme"), rtol=1e-12)
    # no outputs requested: tritonclient asks for binary; tenant given as a parameter by an admin key
    tensor = httpclient.InferInput("features", list(X.shape), "FP64")
    tensor.set_data_from_numpy(X)
    result = client.infer(
        "fraud", [tensor], headers={"Authorization": f"Bearer {env.admin}"}, parameters={"tenant": "globex"}
    )
    np.testing.assert_allclose(result.as_numpy("score"), expected_fraud(env, X, "globex"), rtol=1e-12)


@pytest.mark.parametrize(
    "mutate, status, field",
    [
        (lambda r: r["inputs"][0].update(shape=[2, 5]), 422, "$.inputs[0].shape"),
        (lambda r: r["inputs"][0].update(datatype="INT64"), 422, "$.inputs[0].datatype"),
        (lambda r: r["inputs"][0].update(data=[1.0] * 11), 422, "$.inputs[0].data"),
        (lambda r: r["inputs"][0].update(data=["a"] * 12), 422, "$.inputs[0].data"),
        (lambda r: r.update(outputs=[{"name": "proba"}]), 422, "$.outputs[0].name"),
        (lambda r: r.update(inputs=[]), 422, "$.inputs"),
        (lambda r: r["parameters"].update(tenant="globex"), 403, "$.parameters.tenant"),
    ],
)
def test_oip_errors_name_the_field(env, mutate, status, field):
    request = {
        "inputs": [{"name": "features", "shape": [2, 6], "datatype": "FP64", "data": [0.5] * 12}],
        "parameters": {},
    }
    mutate(request)
    got, body, _ = env.server.post("/v2/models/fraud/infer", request, env.keys["acme"])
    assert (got, body.get("field")) == (status, field), body


def test_oip_json_infer_and_version_path(env):
    X = rows(2, seed=13)
    request = {
        "id": "abc",
        "inputs": [{"name": "features", "shape": [2, 6], "datatype": "FP64", "data": as_json_rows(X)}],
    }
    status, body, _ = env.server.post("/v2/models/fraud/versions/1/infer", request, env.keys["initech"])
    assert status == 200 and body["id"] == "abc" and body["outputs"][0]["shape"] == [2]
    np.testing.assert_allclose(body["outputs"][0]["data"], expected_fraud(env, X, "initech"), rtol=1e-12)
    assert env.server.post("/v2/models/fraud/versions/9/infer", request, env.keys["initech"])[0] == 404
    status, body, _ = env.server.post("/v2/models/fraud/infer", request, headers={})
    assert status == 401
    bad_header = env.server.post(
        "/v2/models/fraud/infer",
        json.dumps(request).encode(),
        env.keys["acme"],
        headers={"Inference-Header-Content-Length": "99999"},
    )
    assert bad_header[0] == 400 and bad_header[1]["field"] == "inference-header-content-length"


def test_oip_json_refuses_bare_nan_and_infinity(env):
    """Python's json (tritonclient's JSON tensors) writes NaN and +-Infinity as bare literals, which
    JSON lacks and /v1 refuses: a 422 naming the tensor says to send null for a missing value, or
    binary data (which carries them)."""
    X = rows(4, seed=15)
    X[0, 1], X[1, 2], X[2, 0] = np.inf, -np.inf, np.nan
    request = {"inputs": [{"name": "features", "shape": list(X.shape), "datatype": "FP64", "data": X.ravel().tolist()}]}
    raw = json.dumps(request).encode()
    assert b"NaN" in raw and b"-Infinity" in raw and b"Infinity," in raw
    status, body, _ = env.server.post("/v2/models/fraud/infer", raw, env.keys["acme"])
    assert (status, body["field"]) == (422, "$.inputs[0].data"), body
    assert re.match(r"(NaN|-?Infinity) is not a JSON number: send null for a missing value", body["error"]), body
    # null is a missing value, as on /v1
    X[0, 1], X[1, 2] = 1.0, 2.0
    nulls = {"inputs": [{**request["inputs"][0], "data": [None if v != v else v for v in X.ravel().tolist()]}]}
    status, body, _ = env.server.post("/v2/models/fraud/infer", json.dumps(nulls).encode(), env.keys["acme"])
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"][0]["data"], expected_fraud(env, X, "acme"), rtol=1e-12)
    # what neither JSON nor Python's json reads is still a 400 naming the body
    status, body, _ = env.server.post("/v2/models/fraud/infer", raw.replace(b"NaN", b"nan"), env.keys["acme"])
    assert (status, body["field"]) == (400, "$"), body
