"""What one server process serves: the current snapshot, how it follows
`deployments/current`, the lanes requests are served through, the served
scores' recording, and the shadow queue.

A request looks up one lane (tenant, intent) of the current generation and
uses only what that lane holds, so it is served entirely by one generation
however many swaps happen meanwhile.  A new
generation is loaded, validated and warmed on a loader thread, then swapped
in by one assignment; models no longer named are dropped from the pool, and
in-flight requests still hold their own references, so nothing is unloaded
under them."""
from __future__ import annotations

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

from .metrics import Metrics, RequestSeries
from .scorelog import ScoreLog

log = logging.getLogger("muse.serve")
MAX_LANES = 4096
# Served scores and request metrics are stored this many times a poll: the work is a few numpy
# calls per series plus ~1 us a request, on the loop, so storing often keeps each pause short (a
# 0.25 s poll at 7,500 req/s paused the loop ~2.5 ms, and every request arriving meanwhile waited).
RECORDS_PER_POLL = 5
IDLE_RECORDS = 40  # a series (and its lane) unused this many records is dropped; made again on use


class Serving:
    def __init__(self, registry: Registry, metrics: Metrics, poll_interval: float = 0.25,
                 shadow_queue: int = 8192, score_log: ScoreLog | None = None,
                 on_poll=None):
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
        self._lanes: tuple[Snapshot | None, dict[tuple[str, str], Lane]] = (None, {})
        self.last_error: str | None = None
        self._refused_generation: int | None = None  # not retried until `current` moves on
        self._shadows: asyncio.Queue | None = None
        self._shadow_capacity = shadow_queue
        self._tasks: list[asyncio.Task] = []
        self.score_log = score_log
        self._series: dict[tuple, _Series] = {}  # see record_served()
        self._record_lock = threading.Lock()
        self.on_poll = on_poll  # called on the loader thread at every poll (e.g. reload API keys)

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm the current generation (if any), and the score log's writer, before the
        first request."""
        if self.score_log is not None:
            await self.in_background(self.score_log.warm)
        await self.refresh()
        self._shadows = asyncio.Queue(self._shadow_capacity)
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._record()),
                       asyncio.create_task(self._shadow_worker())]

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
        self._lanes = (snap, {})
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

    async def _record(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval / RECORDS_PER_POLL)
            try:
                self.metrics.flush()  # on the loop, where observations are appended
                self.record_served()
            except Exception:
                log.exception("recording served scores")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.refresh()
                if self.on_poll is not None:
                    await self.in_background(self.on_poll)
                if self.score_log is not None and self.score_log.due:
                    await self.in_background(self.score_log.flush)
            except Exception:  # the watcher must outlive any one bad deployment or full disk
                log.exception("deployment watcher")

    # -- lanes -----------------------------------------------------------------
    def lane(self, tenant: str, intent: str) -> Lane:
        """The current generation's lane for (tenant, intent); RouteError if it has no route.
        None before the first generation is served."""
        snap, lanes = self._lanes
        lane = lanes.get((tenant, intent))
        if lane is None and snap is not None:
            route = snap.route(tenant, intent)
            predictor = route.active
            with self._record_lock:
                served = self._series_for(tenant, predictor, "active", snap.generation)
            lane = Lane(route, predictor.map_index(tenant),
                        self.metrics.request_series(tenant, intent, predictor.name), served)
            if len(lanes) < MAX_LANES:  # tenant names are the client's: bound what is kept
                lanes[(tenant, intent)] = lane
        return lane

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
            with self._record_lock:
                for (tenant, _, generation), n in zip(items, sizes):
                    self._series_for(tenant, predictor, "shadow", generation).add(scores[:, start:start + n])
                    start += n

    # -- served scores -----------------------------------------------------------
    def _series_for(self, tenant: str, predictor: Predictor, role: str, generation: int) -> _Series:
        """(Under the record lock.)"""
        key = (tenant, id(predictor), role, generation)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(tenant, predictor, role, generation,
                                                 self.score_log.sampled if self.score_log is not None else None)
        return series

    def record_served(self) -> None:
        """Store the scores served (by lanes) and shadowed since the last call: one drift-window
        update and one score-log append per series, whatever the number of requests.  On the
        event loop, where lanes append (so no append falls between taking a series' lists and
        emptying them, and a lane is never dropped under a request); shadows append under the
        lock, on the background thread."""
        with self._record_lock:
            taken = []
            for key, series in list(self._series.items()):
                outs, logged = series.take()
                if outs:
                    taken.append((series, outs, logged))
                    series.idle = 0
                    continue
                series.idle += 1
                if series.idle > IDLE_RECORDS:  # tenant names are the client's: keep only what is in use
                    del self._series[key]
                    lanes = self._lanes[1]
                    lane = lanes.get((series.tenant, series.predictor.intent))
                    if lane is not None and lane.served is series:
                        del lanes[(series.tenant, series.predictor.intent)]
        for series, outs, logged in taken:
            predictor = series.predictor
            scores = np.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
            self.metrics.drift.observe(series.tenant, predictor.intent, predictor.name, scores[2])
            if logged:
                rows = outs if len(logged) == len(outs) else [outs[i] for i, _ in logged]
                kept = scores if rows is outs else np.concatenate(rows, axis=1)
                at_us = np.repeat(np.array([at for _, at in logged], dtype=np.int64), [r.shape[1] for r in rows])
                self.score_log.append(series.tenant, predictor.intent, predictor.name, predictor.version,
                                      series.role, series.generation, kept[0], kept[1], kept[2], at_us)


class Lane:
    """What serving one (tenant, intent) takes, resolved once per generation: the route, its
    active predictor and the tenant's map, and where the requests' metrics and scores go.  A
    request looks up one lane (a dict lookup) instead of routing, mapping and finding series."""

    __slots__ = ("route", "predictor", "tenant", "generation", "map_index", "metrics", "served")

    def __init__(self, route: Route, map_index: int, metrics: RequestSeries, served: _Series):
        self.route, self.predictor = route, route.active
        self.tenant, self.generation = served.tenant, served.generation  # the series' own, kept at hand
        self.map_index, self.metrics, self.served = map_index, metrics, served


class _Series:
    """One (tenant, predictor, role, generation)'s scores since they were last stored: each
    request's [3, n] scores (margins, corrected, mapped), and which of them the score log keeps."""

    __slots__ = ("tenant", "predictor", "role", "generation", "outs", "logged", "sampled", "idle")

    def __init__(self, tenant: str, predictor: Predictor, role: str, generation: int, sampled):
        self.tenant, self.predictor, self.role, self.generation = tenant, predictor, role, generation
        self.outs: list[np.ndarray] = []
        self.logged: list[tuple[int, int]] = []  # (index in outs, microseconds since the epoch)
        self.sampled = sampled  # the score log's per-request sampler, or None without a log
        self.idle = 0  # records with nothing to store

    def add(self, out: np.ndarray) -> None:
        self.outs.append(out)
        if self.sampled is not None and self.sampled():
            self.logged.append((len(self.outs) - 1, int(time.time() * 1e6)))

    def take(self) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        outs, logged = self.outs, self.logged
        self.outs, self.logged = [], []
        return outs, logged
