"""Prometheus metrics, named the way serving dashboards already graph them.

With several Granian workers each process writes its samples to
PROMETHEUS_MULTIPROC_DIR (set by `muse serve` before any worker starts) and
/metrics merges them, so a scrape sees the whole server whichever worker
answers it.

The per-request series are tallied in plain Python on the event loop and
added to prometheus_client's series in bulk by ``flush()`` (on every scrape
and every poll of the deployment watcher): prometheus_client's own observe() takes a lock per bucket
and sum, and the five per request cost ~8 us of a batch-1 request (measured
in-process); a tally costs a list increment."""
from __future__ import annotations

import os
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess, values

from .drift import DriftMonitor

LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536)
MAX_TENANT_LABELS = 1000  # client-chosen tenant names must not grow the series without bound
OTHER = "_other"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Tally:
    """One counter or histogram series' observations since the last flush.  Event loop only.

    Flushing a histogram adds each bucket's count to the child's bucket values; that is
    prometheus_client's own storage layout (``_buckets``, ``_sum``), which observe() writes
    one observation at a time.  tests/test_request_path.py checks a flushed tally against observe()."""

    __slots__ = ("child", "bounds", "counts", "total")

    def __init__(self, child, bounds: tuple[float, ...] = ()):
        self.child = child
        self.bounds = (*bounds, float("inf")) if bounds else ()
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        if self.bounds:
            if any(self.counts):
                for bucket, n in zip(self.child._buckets, self.counts):
                    if n:
                        bucket.inc(n)
                self.child._sum.inc(self.total)
                self.counts = [0] * len(self.bounds)
        elif self.total:
            self.child.inc(self.total)
        self.total = 0.0


class Metrics:
    def __init__(self) -> None:
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
        self.requests = Counter("muse_requests", "Scoring requests by HTTP status.", labels + ["code"], registry=r)
        self.errors = Counter("muse_request_errors", "Failed scoring requests by reason.", labels + ["reason"], registry=r)
        self.latency = Histogram("muse_request_duration_seconds", "Time from request received to response ready.",
                                 labels, buckets=LATENCY_BUCKETS, registry=r)
        self.events = Counter("muse_events_scored", "Events (rows) scored.", labels, registry=r)
        self.batch_rows = Histogram("muse_batch_rows", "Rows per native model call (rows of many requests coalesce).",
                                    ["model"], buckets=ROW_BUCKETS, registry=r)
        self.queue_wait = Histogram("muse_queue_wait_seconds", "Time a request's rows waited for their batch.",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.shadow_events = Counter("muse_shadow_events_scored", "Events scored by shadow predictors.",
                                     ["intent", "predictor"], registry=r)
        self.shadow_dropped = Counter("muse_shadow_dropped", "Shadow work dropped because the shadow queue was full.",
                                      ["intent"], registry=r)
        gauge_mode = {"multiprocess_mode": "liveall"} if self.multiprocess else {}
        self.generation = Gauge("muse_deployment_generation", "Deployment generation being served.",
                                registry=r, **gauge_mode)
        self.ready = Gauge("muse_ready", "1 once every model and kernel is loaded and warm.", registry=r, **gauge_mode)
        self.deploy_failures = Counter("muse_deployment_failures", "Deployments refused while loading.", registry=r)
        self._series: dict = {}  # request and batch labels -> their tallies
        self._tallies: list[_Tally] = []
        self._tenants: set[str] = set()
        self.drift = DriftMonitor(r, self.tenant_label, gauge_kwargs=gauge_mode)

    def tenant_label(self, tenant: str) -> str:
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) >= MAX_TENANT_LABELS:
            return OTHER
        self._tenants.add(tenant)
        return tenant

    def _tally(self, child, bounds: tuple[float, ...] = ()) -> _Tally:
        tally = _Tally(child, bounds)
        self._tallies.append(tally)
        return tally

    def observe_success(self, tenant: str, intent: str, predictor: str, rows: int, seconds: float) -> None:
        series = self._series.get((tenant, intent, predictor))
        if series is None:  # labels() costs microseconds: resolve each series once
            values = (self.tenant_label(tenant), intent, predictor)
            series = self._series[(tenant, intent, predictor)] = (
                self._tally(self.requests.labels(*values, "200")), self._tally(self.events.labels(*values)),
                self._tally(self.latency.labels(*values), LATENCY_BUCKETS))
        series[0].total += 1
        series[1].total += rows
        series[2].observe(seconds)

    def observe_error(self, tenant: str, intent: str, predictor: str, code: int, reason: str) -> None:
        values = (self.tenant_label(tenant), intent, predictor)
        self.requests.labels(*values, str(code)).inc()
        self.errors.labels(*values, reason).inc()

    def observe_batch(self, model: str, rows: int, waits: list[float]) -> None:
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = (self._tally(self.batch_rows.labels(model), ROW_BUCKETS),
                                            self._tally(self.queue_wait.labels(model), LATENCY_BUCKETS))
        series[0].observe(rows)
        for w in waits:
            series[1].observe(w)

    def flush(self) -> None:
        """Hand the tallies to prometheus_client (and, with several workers, to the shared files)."""
        for tally in self._tallies:
            tally.flush()

    def render(self) -> bytes:
        self.flush()
        if self.multiprocess:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)
