"""Lanes: what serving one (tenant, intent) takes, resolved once per generation.

A request looks up one lane (a dict lookup) instead of routing, choosing the
tenant's map and finding where its metrics and scores go; the lane scores the
request (``score``, within the tenant's quota: Context.score_within_quota), then
records it under its ids and queues it for the shadows (``record``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from muse.compile import Scores
from muse.core.batching import Overloaded
from muse.core.snapshot import Route, Snapshot

from .errors import RETRY_AFTER, HTTPError
from .metrics import Metrics, RequestSeries
from .recording import Recorder, ServedSeries
from .scorelog import EventIds

if TYPE_CHECKING:
    from .shadows import ShadowQueue

MAX_LANES = 4096  # tenant names are the client's: bound what is kept


class Lane:
    __slots__ = ("generation", "map_index", "metrics", "predictor", "route", "served", "shadows", "tenant")

    def __init__(
        self,
        route: Route,
        generation: int,
        tenant: str,
        map_index: int,
        metrics: RequestSeries,
        served: ServedSeries,
        shadows: ShadowQueue,
    ):
        self.route, self.predictor, self.generation, self.tenant = route, route.active, generation, tenant
        self.map_index, self.metrics, self.served, self.shadows = map_index, metrics, served, shadows

    async def score(self, X: np.ndarray, weight: int = 1) -> Scores:
        """X scored by the route's active predictor (then ``record`` it); 503 when the tenant's
        queue at a model is full (see muse.core.batching: tenants queue apart, and a busy model
        serves them in proportion to ``weight``, the tenant's priority)."""
        try:
            return await self.predictor.score_async(X, self.map_index, self.tenant, weight)
        except Overloaded as exc:
            raise HTTPError(503, f"overloaded: {exc}; retry later", None, RETRY_AFTER) from None

    def record(self, X: np.ndarray, scores: Scores, ids: EventIds) -> None:
        """A request's scores recorded (its rows logged under ``ids``), and its rows queued for
        the route's shadows, whose rows carry the same ids."""
        self.served.add(scores, ids)
        if self.route.shadows:
            self.shadows.put(self.route, X, self.tenant, self.generation, ids)


class Lanes:
    """The current generation's lanes, made on first use and dropped with their generation."""

    def __init__(self, metrics: Metrics, recorder: Recorder, shadows: ShadowQueue):
        self.metrics, self.recorder, self.shadows = metrics, recorder, shadows
        self._snapshot: Snapshot | None = None
        self._lanes: dict[tuple[str, str], Lane] = {}

    def reset(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on (one assignment: a request sees the old lanes or the new)."""
        self._snapshot, self._lanes = snapshot, {}

    def get(self, tenant: str, intent: str) -> Lane | None:
        """The lane of (tenant, intent); RouteError if it has no route, None before the first
        generation is served."""
        lanes = self._lanes
        lane = lanes.get((tenant, intent))
        if lane is None and self._snapshot is not None:
            snap = self._snapshot
            route = snap.route(tenant, intent)
            predictor = route.active
            with self.recorder.lock:
                served = self.recorder.series(tenant, predictor, "active", snap.generation)
            lane = Lane(
                route,
                snap.generation,
                tenant,
                predictor.map_index(tenant),
                self.metrics.request_series(tenant, intent, predictor.name),
                served,
                self.shadows,
            )
            if len(lanes) < MAX_LANES:
                lanes[(tenant, intent)] = lane
        return lane

    def forget(self, dropped: list[ServedSeries]) -> None:
        """Drop the lanes whose series were dropped as idle (on the loop, between requests)."""
        for series in dropped:
            key = (series.tenant, series.predictor.intent)
            lane = self._lanes.get(key)
            if lane is not None and lane.served is series:
                del self._lanes[key]
