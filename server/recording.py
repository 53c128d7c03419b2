"""Served scores, recorded in bulk: each request's scores are appended to its series
(one per tenant, predictor, role and generation) on the event loop, and ``record``
stores everything since the last call at once -- one drift-window update and one
score-log append per series, whatever the number of requests.  A logged request keeps
its ids (``EventIds``: the request id, the prefix of generated event ids and the client's
event ids) as one tuple; the score log turns them into columns when it writes a file."""

from __future__ import annotations

import operator
import threading
import time
from collections.abc import Callable

import numpy as np

from muse.compile import Scores
from muse.core.predictor import Predictor

from .metrics import Metrics
from .scorelog import NO_IDS, EventIds, ScoreLog

_TIME, _IDS = operator.itemgetter(1), operator.itemgetter(2)  # of a logged request's tuple
IDLE_RECORDS = 40  # a series unused this many records is dropped (tenant names are the client's); made again on use


class ServedSeries:
    """One (tenant, predictor, role, generation)'s scores since they were last stored, and
    which of them the score log keeps."""

    __slots__ = ("generation", "idle", "logged", "outs", "predictor", "role", "sampled", "tenant")

    def __init__(
        self, tenant: str, predictor: Predictor, role: str, generation: int, sampled: Callable[[], bool] | None
    ):
        self.tenant, self.predictor, self.role, self.generation = tenant, predictor, role, generation
        self.outs: list[Scores] = []
        self.logged: list[tuple[int, int, EventIds]] = []  # (index in outs, microseconds since the epoch, ids)
        self.sampled = sampled  # the score log's per-request sampler, or None without a log
        self.idle = 0  # records with nothing to store

    def add(self, scores: Scores, ids: EventIds = NO_IDS) -> None:
        """One request's scores; ``ids`` are what its rows are logged under."""
        self.outs.append(scores)
        if self.sampled is not None and self.sampled():
            self.logged.append((len(self.outs) - 1, int(time.time() * 1e6), ids))

    def take(self) -> tuple[list[Scores], list[tuple[int, int, EventIds]]]:
        outs, logged = self.outs, self.logged
        self.outs, self.logged = [], []
        return outs, logged


class Recorder:
    """Every series of one server process.  Lanes append on the event loop; shadows append
    under the lock on the background thread; ``record`` runs on the loop."""

    def __init__(self, metrics: Metrics, score_log: ScoreLog | None):
        self.metrics = metrics
        self.score_log = score_log
        self._series: dict[tuple[str, int, str, int], ServedSeries] = {}
        self.lock = threading.Lock()

    def series(self, tenant: str, predictor: Predictor, role: str, generation: int) -> ServedSeries:
        """The series scores of this kind go to (call under ``lock``)."""
        key = (tenant, id(predictor), role, generation)
        series = self._series.get(key)
        if series is None:
            sampled = self.score_log.sampled if self.score_log is not None else None
            series = self._series[key] = ServedSeries(tenant, predictor, role, generation, sampled)
        return series

    def record(self) -> list[ServedSeries]:
        """Store the scores added since the last call; returns the series dropped as idle."""
        taken, dropped = [], []
        with self.lock:
            for key, series in list(self._series.items()):
                outs, logged = series.take()
                if outs:
                    taken.append((series, outs, logged))
                    series.idle = 0
                    continue
                series.idle += 1
                if series.idle > IDLE_RECORDS:
                    del self._series[key]
                    dropped.append(series)
        for series, outs, logged in taken:
            self._store(series, outs, logged)
        return dropped

    def _store(self, series: ServedSeries, outs: list[Scores], logged: list[tuple[int, int, EventIds]]) -> None:
        predictor = series.predictor
        scores = Scores.concat(outs)
        self.metrics.drift.observe(series.tenant, predictor.intent, predictor.name, scores.mapped)
        if not logged or self.score_log is None:
            return
        rows = outs if len(logged) == len(outs) else [outs[i] for i, _, _ in logged]
        kept = scores if rows is outs else Scores.concat(rows)
        sizes = [len(r) for r in rows]
        at_us = np.repeat(np.fromiter(map(_TIME, logged), np.int64, len(logged)), sizes)
        self.score_log.append(
            series.tenant,
            predictor.intent,
            predictor.name,
            predictor.version,
            series.role,
            series.generation,
            kept.margin,
            kept.corrected,
            kept.mapped,
            at_us,
            list(map(_IDS, logged)),
            sizes,
        )
