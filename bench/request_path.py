"""Event-loop CPU per scoring request, in-process: the MUSE app against the
no-op app of bench/http.py, driven through the same ASGI calls with no
server or sockets in between, so that only what the apps themselves cost
on the loop's thread is measured (Granian's own per-request work is the
same for both and is what bench/http.py adds).

Concurrent clients keep the loop busy as a loaded server's is; CPU is the
loop thread's own (time.thread_time), so work on the native model thread
is not counted -- the third row shows what the model's hand-off costs by
replacing the model with one that answers at once.

    python -m muse.bench.request_path [--seconds 2] [--clients 1,8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import tempfile
import time

import numpy as np
import uvloop

from muse.bench.http import build_registry
from muse.bench.models import fraud_like_matrix
from muse.bench.noop_app import app as noop_app
from muse.bench.timing import print_table
from muse.compile import CompiledModel, ModelThread, NativeMapTable, Scores


def score_request(key: str) -> tuple[dict, dict]:
    X, _ = fraud_like_matrix(1, seed=11)
    body = json.dumps(
        {
            "tenant": "acme",
            "intent": "fraud",
            "events": [{"features": [None if v != v else round(float(v), 6) for v in X[0]]}],
        }
    ).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/score",
        "headers": [
            (b"host", b"bench"),
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return scope, {"type": "http.request", "body": body, "more_body": False}


async def drive(app, scope: dict, message: dict, clients: int, seconds: float) -> tuple[float, float]:
    """(requests/s, loop CPU us per request) with ``clients`` concurrent callers."""

    async def receive():
        return message

    async def send(m):
        if m["type"] == "http.response.start" and m["status"] != 200:
            raise RuntimeError(f"status {m['status']}")

    done, stop = [0], [False]

    async def client():
        while not stop[0]:
            await app(dict(scope), receive, send)
            done[0] += 1
            await asyncio.sleep(0)  # a server runs each request as its own task

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(0.3)
    done[0] = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    await asyncio.sleep(seconds)
    n, t1, c1 = done[0], time.perf_counter(), time.thread_time()
    stop[0] = True
    await asyncio.gather(*tasks)
    return n / (t1 - t0), (c1 - c0) / n * 1e6


class InstantThread(ModelThread):
    """Stands in for the native model thread: scores at once, no model run (its worker never starts)."""

    def score_async(
        self, model: CompiledModel, X: np.ndarray, maps: NativeMapTable, map_index: int | np.ndarray = 0
    ) -> asyncio.Future[Scores]:
        future: asyncio.Future[Scores] = asyncio.get_running_loop().create_future()
        future.set_result(Scores(np.full((3, len(X)), 0.1)))
        return future


async def measure(registry: pathlib.Path, key: str, clients: list[int], seconds: float, repeats: int) -> list:
    from muse.server.app import MuseApp
    from muse.server.settings import Settings

    app = MuseApp(Settings(registry=str(registry)))
    await app.serving.start()
    scope, message = score_request(key)
    snap = app.serving.snapshot
    assert snap is not None, "start() loads the deployment build_registry applied"
    batcher = snap.route("acme", "fraud").active.batchers[0]
    real_thread = batcher.thread
    rows = []
    try:
        for n in clients:
            for label, target, thread in (
                ("no-op app", noop_app, real_thread),
                ("muse", app, real_thread),
                ("muse, model answers at once", app, InstantThread()),
            ):
                batcher.thread = thread
                runs = [await drive(target, scope, message, n, seconds) for _ in range(repeats)]
                rows.append(
                    [
                        label,
                        n,
                        f"{statistics.median(r[1] for r in runs):.1f}",
                        f"{statistics.median(r[0] for r in runs):,.0f}",
                    ]
                )
    finally:
        batcher.thread = real_thread
        await app.serving.stop()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", default="1,8", help="comma-separated numbers of concurrent callers")
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("bench/results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        registry, key = build_registry(pathlib.Path(tmp), args.results)
        # uvloop: the loop `muse serve` runs
        rows = uvloop.run(measure(registry, key, [int(c) for c in args.clients.split(",")], args.seconds, args.repeats))
    print_table(["app", "concurrent callers", "loop CPU us/request (median)", "requests/s in-process"], rows)


if __name__ == "__main__":
    main()
