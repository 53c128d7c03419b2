"""Shadows: copies of live rows scored by a route's shadow predictors, off the
request's critical path, on the background thread; their scores are recorded,
never returned, and logged under the ids of the request they copy.  When the
queue is full, shadow work is dropped and counted rather than slowing live
traffic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from muse.core.predictor import Predictor
from muse.core.snapshot import Route

from .metrics import Metrics
from .recording import Recorder
from .scorelog import NO_IDS, EventIds

log = logging.getLogger("muse.serve")
BATCH = 256  # queued requests scored together
Work = tuple[str, Predictor, np.ndarray, int, EventIds]  # tenant, shadow predictor, rows, generation, ids


class ShadowQueue:
    def __init__(self, capacity: int, metrics: Metrics, recorder: Recorder):
        self.capacity = capacity
        self.metrics = metrics
        self.recorder = recorder
        self._queue: asyncio.Queue[Work] = asyncio.Queue(capacity)  # binds to the loop that first waits on it

    def put(self, route: Route, X: np.ndarray, tenant: str, generation: int, ids: EventIds = NO_IDS) -> None:
        """Queue a copy of live rows for the route's shadows, logged under the request's ``ids``;
        drop (and count) what does not fit."""
        for predictor in route.shadows:
            try:
                self._queue.put_nowait((tenant, predictor, X, generation, ids))
            except asyncio.QueueFull:
                self.metrics.shadow_dropped.labels(route.intent).inc()

    @property
    def size(self) -> int:
        return self._queue.qsize()

    async def run(self, in_background: Callable[..., Awaitable[Any]]) -> None:
        """Take queued work in batches and score it with ``in_background`` (until cancelled)."""
        queue = self._queue
        while True:
            work = [await queue.get()]
            while not queue.empty() and len(work) < BATCH:
                work.append(queue.get_nowait())
            try:
                await in_background(self._score, work)
            except Exception:
                log.exception("shadow scoring")

    def _score(self, work: list[Work]) -> None:
        groups: dict[int, tuple[Predictor, list[tuple[str, np.ndarray, int, EventIds]]]] = {}
        for tenant, predictor, X, generation, ids in work:
            groups.setdefault(id(predictor), (predictor, []))[1].append((tenant, X, generation, ids))
        for predictor, items in groups.values():
            X = np.concatenate([x for _, x, _, _ in items])
            sizes = [len(x) for _, x, _, _ in items]
            index = np.repeat([predictor.map_index(t) for t, _, _, _ in items], sizes)
            scores = predictor.score(X, index)
            self.metrics.shadow_events.labels(predictor.intent, predictor.name).inc(len(X))
            start = 0
            with self.recorder.lock:
                for (tenant, _, generation, ids), n in zip(items, sizes):
                    series = self.recorder.series(tenant, predictor, "shadow", generation)
                    series.add(scores.rows(start, start + n), ids)
                    start += n
