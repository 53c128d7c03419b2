"""Prometheus metrics, named the way serving dashboards already graph them.

With several Granian workers each process writes its samples to
PROMETHEUS_MULTIPROC_DIR (set by `muse serve` before any worker starts) and
/metrics merges them, so a scrape sees the whole server whichever worker
answers it.

Per-request observations are appended to plain lists on the event loop
(a request's latency, a native call's rows and waits) and binned into
prometheus_client's series in bulk by ``flush()`` (on every scrape, and five
times a deployment poll with the served scores): prometheus_client's own observe() takes a
lock per bucket and sum, and the five per request cost ~8 us of a batch-1
request (measured in-process); a list append costs ~30 ns."""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

from muse.core.batching import BatchStats

from .drift import DriftMonitor

if TYPE_CHECKING:
    from .scorelog import ScoreLog

LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536)
MAX_TENANT_LABELS = 1000  # client-chosen tenant names must not grow the series without bound
OTHER = "_other"
TORN_READS = 5  # tries at reading the multiprocess files while a worker starts or dies
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def add_to_histogram(child, bounds: tuple[float, ...], observations: Sequence[float]) -> None:
    """Add ``observations`` to a prometheus_client histogram series at once: each bucket's count goes
    into the child's bucket values, prometheus_client's own storage layout (``_buckets``,
    ``_sum``), which observe() writes one value at a time.  tests/test_request_path.py checks
    the result against observe()."""
    if not observations:
        return
    # side="left": a value equal to a bound counts in that bound's bucket (Prometheus' `le`).
    counts = np.bincount(np.searchsorted(bounds, observations, side="left"), minlength=len(bounds) + 1)
    for bucket, n in zip(child._buckets, counts.tolist()):
        if n:
            bucket.inc(n)
    child._sum.inc(math.fsum(observations))


class RequestSeries:
    """One (tenant, intent, predictor)'s successful requests since the last flush.  Event loop only."""

    __slots__ = ("bytes", "events", "latencies", "_bytes", "_count", "_events", "_latency")

    def __init__(self, requests: Counter, events: Counter, latency: Histogram, request_bytes: Counter) -> None:
        self.latencies: list[float] = []
        self.events = self.bytes = 0
        self._count, self._events, self._latency, self._bytes = requests, events, latency, request_bytes

    def observe(self, rows: int, seconds: float, nbytes: int) -> None:
        self.latencies.append(seconds)
        self.events += rows
        self.bytes += nbytes

    def flush(self) -> None:
        latencies, self.latencies = self.latencies, []
        events, self.events = self.events, 0
        nbytes, self.bytes = self.bytes, 0
        if latencies:
            self._count.inc(len(latencies))
            self._events.inc(events)
            self._bytes.inc(nbytes)
            add_to_histogram(self._latency, LATENCY_BUCKETS, latencies)


class Metrics:
    def __init__(self, tenant_labels: bool = True) -> None:
        self.tenant_labels = tenant_labels  # False: every series has tenant "" (tenant names are private)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if self.multiprocess:
            # prometheus_client picks file-backed values when it is first imported; a worker forked
            # from a parent that imported it before `muse serve` set the directory would otherwise
            # keep values in memory, and /metrics would be empty.  Decide again, here.
            values.ValueClass = values.get_value_class()
        # A private registry per app: tests run several apps in one process.
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ["tenant", "intent", "predictor"]
        self.requests = Counter("muse_requests", "Scoring requests by HTTP status.", [*labels, "code"], registry=r)
        self.errors = Counter(
            "muse_request_errors", "Failed scoring requests by reason.", [*labels, "reason"], registry=r
        )
        self.latency = Histogram(
            "muse_request_duration_seconds",
            "Time from request received to response ready.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.events = Counter("muse_events_scored", "Events (rows) scored.", labels, registry=r)
        self.request_bytes = Counter(
            "muse_request_bytes", "Bytes of the requests answered (as received).", labels, registry=r
        )
        self.model_seconds = Counter(
            "muse_model_seconds",
            "Time of native model calls, each call's shared among its rows' tenants (showback).",
            ["tenant", "model"],
            registry=r,
        )
        self.rejected_rows = Counter(
            "muse_rejected_rows", "Rows refused for the tenant's quota.", ["tenant", "intent"], registry=r
        )
        self.batch_rows = Histogram(
            "muse_batch_rows",
            "Rows per native model call (rows of many requests coalesce).",
            ["model"],
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "muse_queue_wait_seconds",
            "Time a request's rows waited for their batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_events = Counter(
            "muse_shadow_events_scored", "Events scored by shadow predictors.", ["intent", "predictor"], registry=r
        )
        self.shadow_dropped = Counter(
            "muse_shadow_dropped", "Shadow work dropped because the shadow queue was full.", ["intent"], registry=r
        )
        # one sample per live worker; outside multiprocess mode, prometheus_client's default
        gauge_mode: dict[str, Literal["liveall"]] = {"multiprocess_mode": "liveall"} if self.multiprocess else {}
        sum_mode: dict[str, Literal["livesum"]] = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        self.generation = Gauge(
            "muse_deployment_generation", "Deployment generation being served.", registry=r, **gauge_mode
        )
        self.ready = Gauge("muse_ready", "1 once every model and kernel is loaded and warm.", registry=r, **gauge_mode)
        self.deploy_failures = Counter("muse_deployment_failures", "Deployments refused while loading.", registry=r)
        # The score log's counts (server/scorelog.py keeps them; ``flush`` adds what is new).
        self.scorelog_records = Counter(
            "muse_scorelog_records", "Score log records written to Parquet files.", registry=r
        )
        self.scorelog_dropped = Counter(
            "muse_scorelog_dropped_records",
            "Score log records lost, by reason: beyond the records kept in memory while files cannot be written "
            "(disk_full, io_error), not encodable (encode_error), or still unwritten at shutdown.",
            ["reason"],
            registry=r,
        )
        self.scorelog_failures = Counter(
            "muse_scorelog_write_failures",
            "Score log files that could not be written, by reason (their records are kept and retried).",
            ["reason"],
            registry=r,
        )
        self.scorelog_pending = Gauge(
            "muse_scorelog_pending_records",
            "Score log records in memory, not yet written.",
            registry=r,
            **sum_mode,
        )
        self.score_log: ScoreLog | None = None  # set by watch_score_log
        self._request_series: dict[tuple[str, str, str], RequestSeries] = {}
        self.batch_stats: dict[str, BatchStats] = {}  # model key -> its batcher's stats (the model pool's)
        self._tenants: set[str] = set()
        self.drift = DriftMonitor(r, self.tenant_label, gauge_kwargs=gauge_mode)

    def watch_score_log(self, score_log: ScoreLog) -> None:
        """Report ``score_log``'s counts at every ``flush``; every reason's series shows from now, at 0."""
        self.score_log = score_log
        for reason in score_log.stats.dropped:
            self.scorelog_dropped.labels(reason)
        for reason in score_log.stats.failed:
            self.scorelog_failures.labels(reason)
        self.scorelog_records.inc(0)
        self.scorelog_pending.set(score_log.pending)

    def tenant_label(self, tenant: str) -> str:
        if not self.tenant_labels:
            return ""
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) >= MAX_TENANT_LABELS:
            return OTHER
        self._tenants.add(tenant)
        return tenant

    def request_series(self, tenant: str, intent: str, predictor: str) -> RequestSeries:
        labels = (self.tenant_label(tenant), intent, predictor)
        series = self._request_series.get(labels)
        if series is None:  # labels() costs microseconds: resolve each series once
            series = self._request_series[labels] = RequestSeries(
                self.requests.labels(*labels, "200"),
                self.events.labels(*labels),
                self.latency.labels(*labels),
                self.request_bytes.labels(*labels),
            )
        return series

    def observe_error(self, tenant: str, intent: str, predictor: str, code: int, reason: str) -> None:
        labels = (self.tenant_label(tenant), intent, predictor)
        self.requests.labels(*labels, str(code)).inc()
        self.errors.labels(*labels, reason).inc()

    def flush(self) -> None:
        """Hand what was observed to prometheus_client (and, with several workers, to the shared
        files).  On the event loop, where the lists are appended."""
        for series in list(self._request_series.values()):
            series.flush()
        for model, stats in list(self.batch_stats.items()):  # the loader thread may add a model
            rows, waits = stats.take()
            for tenant, seconds in stats.take_seconds().items():
                self.model_seconds.labels(self.tenant_label(tenant), model).inc(seconds)
            add_to_histogram(self.batch_rows.labels(model), ROW_BUCKETS, rows)
            add_to_histogram(self.queue_wait.labels(model), LATENCY_BUCKETS, waits)
        if self.score_log is not None:
            written, dropped, failed = self.score_log.stats.take()
            if written:
                self.scorelog_records.inc(written)
            for reason, n in dropped.items():
                if n:
                    self.scorelog_dropped.labels(reason).inc(n)
            for reason, n in failed.items():
                if n:
                    self.scorelog_failures.labels(reason).inc(n)
            self.scorelog_pending.set(self.score_log.pending)

    def render(self) -> bytes:
        self.flush()
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        for _ in range(TORN_READS - 1):
            try:
                return generate_latest(merged)
            except (struct.error, FileNotFoundError):
                # a worker starting (its file created, not yet sized) or one that died (its
                # files removed) while they were read: read them again
                continue
        return generate_latest(merged)
