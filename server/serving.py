"""What one server process serves: the current snapshot, how it follows
`deployments/current`, and the shadow queue.

A request reads ``serving.snapshot`` once and uses only that object, so it is
served entirely by one generation however many swaps happen meanwhile.  A new
generation is loaded, validated and warmed on a loader thread, then swapped
in by one assignment; models no longer named are dropped from the pool, and
in-flight requests still hold their own references, so nothing is unloaded
under them."""
from __future__ import annotations

import array
import asyncio
import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from muse.core.deploy import DeploymentStore
from muse.core.predictor import Predictor
from muse.core.registry import Registry
from muse.core.snapshot import ModelPool, Route, Snapshot, build_snapshot
from muse.core.spec import SpecError

from .metrics import Metrics
from .scorelog import ScoreLog

log = logging.getLogger("muse.serve")


class Serving:
    def __init__(self, registry: Registry, metrics: Metrics, poll_interval: float = 0.25,
                 shadow_queue: int = 8192, score_log: ScoreLog | None = None,
                 on_poll=None):
        self.registry = registry
        self.store = DeploymentStore(registry)
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.pool = ModelPool(registry)
        self.pool.on_batch = metrics.observe_batch
        # One thread for background work: loading generations, shadows, score log writes.
        # (Running it niced was measured no better: it can be descheduled holding the GIL.)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="muse-loader")
        self.snapshot: Snapshot | None = None
        self.last_error: str | None = None
        self._refused_generation: int | None = None  # not retried until `current` moves on
        self._shadows: asyncio.Queue | None = None
        self._shadow_capacity = shadow_queue
        self._tasks: list[asyncio.Task] = []
        self.score_log = score_log
        self._series: dict[tuple, _Series] = {}  # see record()
        self._record_lock = threading.Lock()
        self.on_poll = on_poll  # called on the loader thread at every poll (e.g. reload API keys)

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm the current generation (if any) before the first request."""
        await self.refresh()
        self._shadows = asyncio.Queue(self._shadow_capacity)
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._shadow_worker())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._loader.shutdown(wait=True)  # finishes shadow work already taken
        self.pool.thread.close()
        self.record_served()
        if self.score_log is not None:
            self.score_log.flush()  # nothing logged is lost on a clean shutdown

    async def in_background(self, fn, *args):
        """Run ``fn`` on the background thread (loading, shadows, log writes, admin work)."""
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    async def refresh(self) -> bool:
        """Swap to the generation `current` names if it differs; False if there is nothing new."""
        try:
            generation = self.store.current_generation()
        except SpecError as exc:
            return self._refused(str(exc))
        if generation is None or (self.snapshot and self.snapshot.generation == generation):
            return False
        if generation == self._refused_generation:
            return False
        started = time.perf_counter()
        try:
            snap = await self.in_background(self._load, generation)
        except (SpecError, OSError) as exc:
            self._refused_generation = generation
            return self._refused(f"generation {generation}: {exc}")
        self.install(snap)
        log.info("serving generation %d (loaded in %.2f s)", generation, time.perf_counter() - started)
        return True

    def _load(self, generation: int) -> Snapshot:
        spec = self.store.read(generation)
        snap = build_snapshot(spec, self.pool, generation, source=str(self.store.path(generation)))
        snap.warm()
        return snap

    def install(self, snap: Snapshot) -> None:
        self.pool.configure(snap)
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
            log.error("deployment refused, still serving generation %s: %s",
                      self.snapshot.generation if self.snapshot else "none", message)
            self.metrics.deploy_failures.inc()
        self.last_error = message
        return False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.metrics.flush()  # on the loop, where the tallies are written
                self.record_served()
                await self.refresh()
                if self.on_poll is not None:
                    await self.in_background(self.on_poll)
                if self.score_log is not None and self.score_log.due:
                    await self.in_background(self.score_log.flush)
            except Exception:  # the watcher must outlive any one bad deployment or full disk
                log.exception("deployment watcher")

    # -- shadows ---------------------------------------------------------------
    def shadow(self, route: Route, X: np.ndarray, tenant: str, generation: int) -> None:
        """Queue a copy of live rows for the route's shadows; drop (and count) when full."""
        for predictor in route.shadows:
            try:
                self._shadows.put_nowait((tenant, predictor, X, generation))
            except asyncio.QueueFull:
                self.metrics.shadow_dropped.labels(route.intent).inc()

    async def _shadow_worker(self) -> None:
        while True:
            work = [await self._shadows.get()]
            while not self._shadows.empty() and len(work) < 256:
                work.append(self._shadows.get_nowait())
            try:
                await self.in_background(self._score_shadows, work)
            except Exception:
                log.exception("shadow scoring")

    def _score_shadows(self, work: list) -> None:
        groups: dict[int, tuple[Predictor, list]] = {}
        for tenant, predictor, X, generation in work:
            groups.setdefault(id(predictor), (predictor, []))[1].append((tenant, X, generation))
        for predictor, items in groups.values():
            X = np.concatenate([x for _, x, _ in items])
            sizes = [len(x) for _, x, _ in items]
            index = np.repeat([predictor.map_index(t) for t, _, _ in items], sizes)
            scores = predictor.score_now(X, index)
            self.metrics.shadow_events.labels(predictor.intent, predictor.name).inc(len(X))
            start = 0
            for (tenant, _, generation), n in zip(items, sizes):
                part = slice(start, start + n)
                start += n
                self.record(tenant, predictor, "shadow", generation,
                            scores.margins[part], scores.corrected[part], scores.mapped[part])

    def record(self, tenant: str, predictor: Predictor, role: str, generation: int,
               margins: np.ndarray, corrected: np.ndarray, mapped: np.ndarray) -> None:
        """Scores that were served (role "active") or shadowed, for the drift windows and the
        score log: appended to their series' columns here (a dict lookup and a few array
        appends), stored in bulk at each poll by ``record_served``.  Thread-safe, as shadows
        are recorded from the background thread."""
        key = (tenant, id(predictor), role, generation)
        with self._record_lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(tenant, predictor, role, generation)
            series.add(margins, corrected, mapped, self.score_log is not None and self.score_log.sampled())

    def record_served(self) -> None:
        """Store what ``record`` collected since the last call: one drift-window update and one
        score-log append per series, whatever the number of requests."""
        with self._record_lock:
            collected, self._series = self._series, {}
        for series in collected.values():
            predictor = series.predictor
            if series.drift:
                self.metrics.drift.observe(series.tenant, predictor.intent, predictor.name,
                                           np.frombuffer(series.drift))
            if series.times:
                self.score_log.append(series.tenant, predictor.intent, predictor.name, predictor.version,
                                      series.role, series.generation, np.frombuffer(series.margins),
                                      np.frombuffer(series.corrected), np.frombuffer(series.mapped),
                                      np.frombuffer(series.times, dtype=np.int64))


class _Series:
    """One (tenant, predictor, role, generation)'s scores since the last poll: every mapped
    score for the drift window, and the sampled requests' rows for the score log."""

    __slots__ = ("tenant", "predictor", "role", "generation", "drift", "margins", "corrected", "mapped", "times")

    def __init__(self, tenant: str, predictor: Predictor, role: str, generation: int):
        self.tenant, self.predictor, self.role, self.generation = tenant, predictor, role, generation
        self.drift, self.margins, self.corrected, self.mapped = (array.array("d") for _ in range(4))
        self.times = array.array("q")  # microseconds since the epoch

    def add(self, margins: np.ndarray, corrected: np.ndarray, mapped: np.ndarray, logged: bool) -> None:
        # frombytes takes byte buffers only; tobytes is the cheapest way there (~0.1 us).
        self.drift.frombytes(mapped.tobytes())
        if logged:
            self.margins.frombytes(margins.tobytes())
            self.corrected.frombytes(corrected.tobytes())
            self.mapped.frombytes(mapped.tobytes())
            now = int(time.time() * 1e6)
            if len(mapped) == 1:
                self.times.append(now)
            else:
                self.times.extend([now] * len(mapped))
