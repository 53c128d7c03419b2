"""A server under faults and hostile clients, on loopback: a worker killed under load, idle
connections past the connection cap, a trickled body, an idle keep-alive connection."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import sys
import threading

import pytest
from conftest import get_case
from helpers import make_registry, rows
from test_native_isolation import fake_library, replace_library

from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec
from muse.server.auth import add_key, keys_path
from muse.server.testing import LocalServer, as_json_rows, deploy, request, scrape, wait_until

WORKERS = 2
CAP = 32  # connections per worker
TIMEOUT = 1.0  # --header-timeout and --body-timeout, seconds


@pytest.fixture(scope="module")
def env(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("faults")
    reg = make_registry(root / "registry", {"lightgbm": get_case("lightgbm", model_dir, root / "compiled")})
    deploy(
        reg,
        DeploymentSpec(
            predictors=[PredictorSpec("fraud-lgb", "1", "fraud", ["lightgbm/1"])],
            routes=[RouteSpec("*", "fraud", "fraud-lgb")],
        ),
    )
    key = add_key(keys_path(reg.root), "acme", False)[1]
    admin = add_key(keys_path(reg.root), None, True)[1]
    # a model whose library crashes as it loads, its manifest's checksum updated to match
    shutil.copytree(reg.model_dir("lightgbm", "1"), reg.models_dir / "crash" / "1")
    replace_library(reg.models_dir / "crash" / "1", fake_library(root, "crash", "CTOR_SEGV"))
    server = LocalServer(
        reg.root,
        "--max-connections",
        str(CAP),
        "--header-timeout",
        str(TIMEOUT),
        "--body-timeout",
        str(TIMEOUT),
        "--access-log",
        workers=WORKERS,
    )
    try:
        server.wait_ready(generation=1)
        wait_until(lambda: len(ready_workers(server.port)) == WORKERS, 60, "every worker ready")
        body = json.dumps({"tenant": "acme", "intent": "fraud", "events": [{"features": as_json_rows(rows(1, 1))[0]}]})
        yield server, key, body.encode(), admin
    finally:
        server.stop()


def metrics(port: int) -> dict[str, float]:
    try:
        return scrape(port)
    except OSError:  # the scrape landed on the worker being killed
        return {}


def ready_workers(port: int) -> list[int]:
    """Pids of the workers whose muse_ready is 1 (a killed worker's series is removed)."""
    samples = metrics(port)
    return [int(m.group(1)) for k, v in samples.items() if v == 1 and (m := re.match(r'muse_ready\{pid="(\d+)"\}', k))]


def score(env, timeout: float = 10) -> int:
    server, key, body, _ = env
    status, _, _ = request(server.port, "POST", "/v1/score", body, {"authorization": f"Bearer {key}"}, timeout=timeout)
    return status


def test_a_killed_worker_is_replaced_while_the_other_serves(env):
    server = env[0]
    victim = ready_workers(server.port)[0]
    results: list[object] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(score(env, timeout=5))
            except OSError as exc:  # a request the killed worker held
                results.append(exc)

    client = threading.Thread(target=load)
    client.start()
    try:
        wait_until(lambda: len(results) >= 20, 30, "requests before the kill")
        os.kill(victim, signal.SIGKILL)
        at_kill = len(results)
        wait_until(lambda: metrics(server.port).get("muse_worker_restarts_total") == 1, 30, "the restart counted")
        workers = wait_until(
            lambda: (w := ready_workers(server.port)) and len(w) == WORKERS and victim not in w and w,
            60,
            "a new worker ready in place of the killed one",
        )
        assert victim not in workers
        after = len(results)
        wait_until(lambda: len(results) >= after + 50, 30, "requests after the restart")
    finally:
        stop.set()
        client.join()
    failed = [r for r in results if r != 200]
    # one client, one request at a time: at most the request in flight on the killed worker fails
    assert len(failed) <= 1, failed
    assert all(r == 200 for r in results[at_kill + 2 :]), results[at_kill:]
    assert "died (killed by SIGKILL)" in server.output(whole=True)


def test_idle_connections_beyond_the_cap_do_not_lock_clients_out(env):
    server = env[0]
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3 * CAP * WORKERS)]
    try:
        # more idle connections than every worker's cap together: a new client waits in the
        # backlog only until the header timeout frees the idle ones' places
        assert score(env, timeout=30) == 200
        for s in idle[:5]:
            s.settimeout(30)
            assert s.recv(1) == b""  # closed by the server: it sent no request in time
    finally:
        for s in idle:
            s.close()


def test_a_trickled_body_gets_408(env):
    server, key, body, _ = env
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        head = (
            f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        s.sendall(head.encode() + body[:5])  # then nothing more
        s.settimeout(30)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within" in answer and b'"field":"body"' in answer


def test_an_idle_keep_alive_connection_is_closed(env):
    server = env[0]
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(30)
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        while chunk := s.recv(4096):  # then idle: the server closes it after the header timeout
            answer += chunk
    assert score(env) == 200


def log_events(server: LocalServer, event: str) -> list[dict]:
    """The server's JSON log lines of one ``event``."""
    lines = [json.loads(line) for line in server.output(whole=True).splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def test_start_up_says_what_is_served(env):
    (start,) = log_events(env[0], "start")
    assert start["auth"] is True and start["workers"] == WORKERS and start["generation"] == 1
    assert start["registry"] == str(env[0].registry.resolve()) and start["max_connections"] == CAP
    assert start["level"] == "INFO" and start["logger"] == "muse.serve" and "time" in start


def test_a_deleted_current_is_logged_and_serving_goes_on(env):
    server = env[0]
    current = server.registry / "deployments" / "current"
    saved = current.read_bytes()
    current.unlink()
    try:
        missing = wait_until(lambda: log_events(server, "current_missing"), 30, "the missing current logged")
        assert missing[0]["level"] == "WARNING" and missing[0]["generation"] == 1
        assert score(env) == 200
    finally:
        current.write_bytes(saved)
    wait_until(lambda: "is back: generation 1" in server.output(whole=True), 30, "current back, logged")


def test_the_access_log_names_the_request_the_key_and_the_lane(env):
    server, key, body, _ = env
    status, _, _ = request(
        server.port, "POST", "/v1/score", body, {"authorization": f"Bearer {key}", "x-request-id": "req-42"}
    )
    assert status == 200
    line = wait_until(
        lambda: [e for e in log_events(server, "request") if e.get("request_id") == "req-42"], 30, "the access line"
    )[0]
    assert line["logger"] == "muse.access" and line["status"] == 200 and line["path"] == "/v1/score"
    assert line["key_id"] == key.split("_")[1] and line["tenant"] == "acme" and line["intent"] == "fraud"
    assert (line["predictor"], line["version"], line["generation"]) == ("fraud-lgb", "1", 1) and line["ms"] > 0
    # refused before any lane: no tenant, but the status, and no key for a request without one
    status, _, _ = request(server.port, "POST", "/v1/score", body, {"x-request-id": "req-43"})
    assert status == 401
    line = wait_until(
        lambda: [e for e in log_events(server, "request") if e.get("request_id") == "req-43"], 30, "the 401 line"
    )[0]
    assert line["status"] == 401 and line["key_id"] is None and "tenant" not in line


def test_a_crashing_library_is_refused_and_serving_goes_on(env):
    server, admin = env[0], env[3]
    restarts = metrics(server.port).get("muse_worker_restarts_total")
    spec = {
        "predictors": [
            {"name": "fraud-lgb", "version": "1", "intent": "fraud", "models": ["lightgbm/1"]},
            {"name": "fraud-crash", "version": "1", "intent": "fraud", "models": ["crash/1"]},
        ],
        "routes": [{"tenant": "*", "intent": "fraud", "active": "fraud-lgb", "shadows": ["fraud-crash"]}],
    }
    status, body, _ = server.post("/admin/deployment/validate", spec, admin)
    assert status == 422 and "killed by SIGSEGV while loading" in body["error"], body
    assert score(env) == 200
    assert metrics(server.port).get("muse_worker_restarts_total") == restarts


def test_hostile_bodies_are_4xx_naming_the_field_and_add_no_label(env):
    server, key, _, _ = env
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    deep = b"[" * 100_000 + b"]" * 100_000
    oip = b'{"inputs": [{"name": "f", "shape": [1, 6], "datatype": "FP64", "data": ' + deep + b"}]}"
    status, body, _ = request(server.port, "POST", "/v2/models/fraud/infer", oip, headers)
    assert status in (400, 422) and body["field"].startswith("$"), body
    for value in ('"0.1"', "true", "NaN"):
        raw = f'{{"inputs": [{{"name": "f", "shape": [1, 6], "datatype": "FP64", "data": [{value}, 1, 1, 1, 1, 1]}}]}}'
        status, body, _ = request(server.port, "POST", "/v2/models/fraud/infer", raw.encode(), headers)
        assert (status, body["field"]) == (422, "$.inputs[0].data"), (value, body)
    for tenant in ("", "../../x", "evil\u202etxt.exe"):
        v1 = json.dumps({"tenant": tenant, "intent": "fraud", "events": [{"features": [0.5] * 6}]}).encode()
        status, body, _ = request(server.port, "POST", "/v1/score", v1, headers)
        assert (status, body["field"]) == (422, "$.tenant"), (tenant, body)
    other = json.dumps({"tenant": "someone-else", "intent": "fraud", "events": [{"features": [0.5] * 6}]}).encode()
    assert request(server.port, "POST", "/v1/score", other, headers)[0] == 403
    labels = " ".join(metrics(server.port))
    assert "someone-else" not in labels and "../../x" not in labels and "\u202e" not in labels


def test_a_server_whose_library_was_corrupted_after_deploy_stays_up(tmp_path, model_dir):
    reg = make_registry(tmp_path / "registry", {})
    shutil.copytree(get_case("lightgbm", model_dir, tmp_path / "compiled").artifact, reg.models_dir / "m" / "1")
    deploy(
        reg,
        DeploymentSpec(predictors=[PredictorSpec("p", "1", "fraud", ["m/1"])], routes=[RouteSpec("*", "fraud", "p")]),
    )
    replace_library(reg.models_dir / "m" / "1", fake_library(tmp_path, "crash", "CTOR_SEGV"))
    with LocalServer(reg.root) as server:  # live (it answers), never ready
        refused = wait_until(lambda: log_events(server, "generation_refused"), 30, "the refusal logged")
        assert "killed by SIGSEGV while loading" in refused[0]["message"]
        assert server.get("/v2/health/ready")[0] == 503 and server.proc.poll() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_stop_when_the_serve_process_is_killed(tmp_path):
    """SIGKILL of `muse serve` (an OOM kill, kill -9) takes its workers with it: an orphan
    would keep answering on the port, unsupervised."""
    server = LocalServer(tmp_path, "--no-auth", workers=2)
    workers = [
        int(p) for p in pathlib.Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    ]
    assert len(workers) == 2
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()

    def exited(pid: int) -> bool:
        try:
            return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    try:
        wait_until(lambda: all(exited(p) for p in workers), 30, "the workers to exit")
    finally:
        for p in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        server.stop()
