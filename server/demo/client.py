"""What tenants' services would do: POST batches of events with their keys, over
keep-alive connections, a few requests in flight."""

from __future__ import annotations

import concurrent.futures
import http.client
import itertools
import json
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from muse.server import testing

BATCH = 64  # events per request
CONCURRENCY = 8  # requests in flight


class Scored:
    """Scores and answering predictor per event; a failed request leaves NaN and None."""

    def __init__(self, n: int):
        self.scores = np.full(n, np.nan)
        self.predictors = np.full(n, None, dtype=object)
        self.ids = np.full(n, None, dtype=object)  # each event's id, as the server answered it
        self.requests = 0
        self.failures: list[str] = []  # one line per failed request


class Burst:
    """Requests sent at once on their own connections: each one's status; one refusal (429)
    as an example, with its Retry-After; and the requests neither answered nor refused."""

    def __init__(self, tenant: str, requests: int):
        self.tenant = tenant
        self.requests = requests
        self.statuses: list[int] = []
        self.refused_example = ""  # a 429's JSON body
        self.retry_after = ""  # its Retry-After header
        self.failures: list[str] = []  # neither 200 nor 429, one line per request

    def count(self, status: int) -> int:
        return self.statuses.count(status)


class DemoClient:
    def __init__(self, port: int, keys: Mapping[str, str]):
        self.port = port
        self.keys = dict(keys)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.done = 0  # requests answered by the current score_all
        self.total = 0  # requests it sends

    def _call(self, method: str, path: str, body: bytes, key: str) -> tuple[int, bytes]:
        if not hasattr(self._local, "conn"):
            self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        try:
            self._local.conn.request(method, path, body=body, headers=headers)
            resp = self._local.conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            del self._local.conn  # reconnect on the next call
            raise

    def score(self, payload: Mapping[str, Any]) -> tuple[int, Any]:
        status, body = self._call("POST", "/v1/score", json.dumps(payload).encode(), self.keys[payload["tenant"]])
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def score_all(self, intent: str, X: np.ndarray, tenants: np.ndarray, seconds: float = 0.0) -> Scored:
        """Every event of ``X`` for its tenant, in batches, tenants interleaved; ``seconds``:
        spread the requests evenly over at least this long, as traffic arrives over time."""
        out = Scored(len(X))
        per_tenant = []
        for t in self.keys:
            idx = np.flatnonzero(tenants == t)
            per_tenant.append([(t, idx[i : i + BATCH]) for i in range(0, len(idx), BATCH)])
        jobs = [job for batch in itertools.zip_longest(*per_tenant) for job in batch if job]
        with self._lock:
            self.done, self.total = 0, len(jobs)
        out.requests = len(jobs)

        start = time.monotonic()

        def one(i: int, job: tuple[str, np.ndarray]) -> None:
            time.sleep(max(0.0, start + i * seconds / len(jobs) - time.monotonic()))
            tenant, idx = job
            rows = testing.as_json_rows(X[idx])
            try:
                status, body = self.score(
                    {"tenant": tenant, "intent": intent, "events": [{"features": r} for r in rows]}
                )
            except (OSError, http.client.HTTPException) as exc:
                status, body = 0, f"{type(exc).__name__}: {exc}"
            with self._lock:
                if status == 200:
                    out.scores[idx] = body["scores"]
                    out.predictors[idx] = body["predictor"]
                    out.ids[idx] = body["ids"]
                else:
                    out.failures.append(f"{tenant}: {status} {str(body)[:200]}")
                self.done += 1

        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, range(len(jobs)), jobs))
        return out

    def burst(self, tenant: str, intent: str, X: np.ndarray, requests: int) -> Burst:
        """``requests`` requests of BATCH events of ``X`` (taken in turn, from the start again
        when it runs out) for ``tenant``, all at once: each on its own connection, encoded and
        connected beforehand, released together."""
        out = Burst(tenant, requests)
        rows = testing.as_json_rows(X[np.arange(requests * BATCH) % len(X)])
        bodies = [
            json.dumps(
                {"tenant": tenant, "intent": intent, "events": [{"features": r} for r in rows[i : i + BATCH]]}
            ).encode()
            for i in range(0, len(rows), BATCH)
        ]
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.keys[tenant]}"}
        conns = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=30) for _ in bodies]
        for conn in conns:
            conn.connect()
        start = threading.Barrier(len(conns), timeout=30)

        def one(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, str, bytes]:
            try:
                start.wait()
                conn.request("POST", "/v1/score", body=body, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.getheader("retry-after") or "", resp.read()
            except (OSError, http.client.HTTPException, threading.BrokenBarrierError) as exc:
                return 0, "", f"{type(exc).__name__}: {exc}".encode()
            finally:
                conn.close()

        with concurrent.futures.ThreadPoolExecutor(len(conns)) as pool:
            answers = list(pool.map(one, conns, bodies))
        for status, retry_after, body in answers:
            out.statuses.append(status)
            if status == 429 and not out.refused_example:
                out.refused_example, out.retry_after = body.decode(errors="replace"), retry_after
            elif status not in (200, 429):
                out.failures.append(f"{tenant}: {status} {body.decode(errors='replace')[:200]}")
        return out

    def wait_generation(self, generation: int | None, timeout: float = 120) -> None:
        testing.wait_for(self.port, generation=generation, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        return testing.scrape(self.port)
