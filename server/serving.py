"""What one server process serves: the current snapshot and how it follows
`deployments/current`, with the lanes requests go through (server/lanes.py),
the shadow queue (server/shadows.py) and the recording of served scores
(server/recording.py).

A request looks up one lane (tenant, intent) of the current generation and
uses only what that lane holds, so it is served entirely by one generation
however many swaps happen meanwhile.  A new generation is loaded, validated
and warmed on a loader thread, then swapped in by one assignment; models no
longer named are dropped from the pool, and in-flight requests still hold
their own references, so nothing is unloaded under them."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from muse.core.deploy import DeploymentStore
from muse.core.registry import Registry
from muse.core.snapshot import ModelPool, Snapshot, build_snapshot
from muse.core.spec import SpecError

from .lanes import Lane, Lanes
from .metrics import Metrics
from .recording import Recorder
from .scorelog import ScoreLog
from .shadows import ShadowQueue

log = logging.getLogger("muse.serve")
T = TypeVar("T")
# Served scores and request metrics are stored this many times a poll: the work is a few numpy
# calls per series plus ~1 us a request, on the loop, so storing often keeps each pause short (a
# 0.25 s poll at 7,500 req/s paused the loop ~2.5 ms, and every request arriving meanwhile waited).
RECORDS_PER_POLL = 5


class Serving:
    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        poll_interval: float = 0.25,
        shadow_queue: int = 8192,
        score_log: ScoreLog | None = None,
        on_poll: Callable[[], Any] | None = None,
    ):
        self.registry = registry
        self.store = DeploymentStore(registry)
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.pool = ModelPool(registry)
        metrics.batch_stats = self.pool.stats
        # One thread for background work: loading generations, shadows, score log writes.
        # (Running it niced was measured no better: it can be descheduled holding the GIL.)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="muse-loader")
        self.snapshot: Snapshot | None = None
        self.last_error: str | None = None
        self._refused_generation: int | None = None  # not retried until `current` moves on
        self._current_missing = False  # said once, until `current` is back
        self.score_log = score_log
        if score_log is not None:
            metrics.watch_score_log(score_log)  # its written, dropped and pending records
        self.recorder = Recorder(metrics, score_log)
        self.shadows = ShadowQueue(shadow_queue, metrics, self.recorder)
        self.lanes = Lanes(metrics, self.recorder, self.shadows)
        self.on_poll = on_poll  # called on the loader thread at every poll (e.g. reload API keys)
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm the current generation (if any), and the score log's writer, before the
        first request."""
        if self.score_log is not None:
            await self.in_background(self.score_log.warm)
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._watch()),
            asyncio.create_task(self._record()),
            asyncio.create_task(self.shadows.run(self.in_background)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._loader.shutdown(wait=True)  # finishes shadow work already taken
        self.pool.thread.close()
        self.record_served()
        if self.score_log is not None:
            try:
                self.score_log.close()  # written, or logged and counted as lost
            except Exception:
                log.exception("score log, at shutdown")
        self.metrics.flush()  # with several workers, the last counts reach the shared files

    async def in_background(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the background thread (loading, shadows, log writes, admin work)."""
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    def lane(self, tenant: str, intent: str) -> Lane | None:
        """The current generation's lane for (tenant, intent); RouteError if it has no route.
        None before the first generation is served."""
        return self.lanes.get(tenant, intent)

    def record_served(self) -> None:
        """Store the scores served and shadowed since the last call (on the event loop, where
        lanes append, so a lane is never dropped under a request)."""
        self.lanes.forget(self.recorder.record())

    # -- following deployments -------------------------------------------------
    async def refresh(self) -> bool:
        """Swap to the generation `current` names if it differs; False if there is nothing new."""
        try:
            generation = self.store.current_generation()
        except SpecError as exc:
            return self._refused(str(exc))
        if generation is None:
            if not self._current_missing:
                self._current_missing = True
                served = self.snapshot.generation if self.snapshot else None
                log.warning(
                    "%s is missing; still serving generation %s until a deployment is published",
                    self.store.current_path,
                    served,
                    extra={"event": "current_missing", "generation": served},
                )
            return False
        if self._current_missing:
            self._current_missing = False
            log.info("%s is back: generation %d", self.store.current_path, generation)
        if self.snapshot and self.snapshot.generation == generation:
            return False
        if generation == self._refused_generation:
            return False
        started = time.perf_counter()
        try:
            snap = await self.in_background(self._load, generation)
        except (SpecError, OSError) as exc:
            self._refused_generation = generation
            return self._refused(f"generation {generation}: {exc}")
        previous = self.snapshot.generation if self.snapshot else None
        self.install(snap)
        seconds = time.perf_counter() - started
        log.info(
            "serving generation %d (loaded in %.2f s; was %s)",
            generation,
            seconds,
            previous,
            extra={"event": "generation_swapped", "generation": generation, "previous": previous, "seconds": seconds},
        )
        return True

    def _load(self, generation: int) -> Snapshot:
        spec = self.store.read(generation)
        snap = build_snapshot(spec, self.pool, generation, source=str(self.store.path(generation)))
        snap.warm()
        return snap

    def install(self, snap: Snapshot) -> None:
        self.pool.configure(snap)
        self.lanes.reset(snap)
        self.snapshot = snap
        self.last_error = None
        self.pool.release_unused(snap.model_refs)
        self.metrics.generation.set(snap.generation)
        self.metrics.ready.set(1)
        # What is loaded by now (modules, kernels, models, this snapshot) lives on: keep it out of
        # the cyclic collector's full passes, which walked all of it (29 ms each; one showed as a
        # 54 ms stall in bench/http.py).  Snapshots hold no reference cycles, so one that is
        # replaced later is still freed by reference counting (tests/test_deploy.py checks).
        gc.freeze()

    def _refused(self, message: str) -> bool:
        if message != self.last_error:
            served = self.snapshot.generation if self.snapshot else None
            log.error(
                "deployment refused, still serving generation %s: %s",
                served,
                message,
                extra={"event": "generation_refused", "generation": served},
            )
            self.metrics.deploy_failures.inc()
        self.last_error = message
        return False

    async def _record(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval / RECORDS_PER_POLL)
            try:
                self.metrics.flush()  # on the loop, where observations are appended
                self.record_served()
            except Exception:
                log.exception("recording served scores")

    async def _watch(self) -> None:
        """Every poll: follow deployments, run ``on_poll``, flush the score log if due -- each
        outliving its own failures, and none skipped for another's (the score log reports its
        own write failures; what reaches here is unexpected)."""
        while True:
            await asyncio.sleep(self.poll_interval)
            await self._guarded("deployment watcher", self.refresh)
            if self.on_poll is not None:
                await self._guarded("poll hook", self.in_background, self.on_poll)
            if self.score_log is not None and self.score_log.due:
                await self._guarded("score log flush", self.in_background, self.score_log.flush)

    @staticmethod
    async def _guarded(what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:
            log.exception(what)
