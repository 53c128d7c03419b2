"""Prometheus metrics, named the way serving dashboards already graph them.

With several Granian workers each process writes its samples to
PROMETHEUS_MULTIPROC_DIR (set by `muse serve` before any worker starts) and
/metrics merges them, so a scrape sees the whole server whichever worker
answers it."""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess, values

from .drift import DriftMonitor

LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536)
MAX_TENANT_LABELS = 1000  # client-chosen tenant names must not grow the series without bound
OTHER = "_other"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        self._children: dict[tuple, tuple] = {}
        self._tenants: set[str] = set()
        self.drift = DriftMonitor(r, self.tenant_label, gauge_kwargs=gauge_mode)

    def tenant_label(self, tenant: str) -> str:
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) >= MAX_TENANT_LABELS:
            return OTHER
        self._tenants.add(tenant)
        return tenant

    def observe_success(self, tenant: str, intent: str, predictor: str, rows: int, seconds: float) -> None:
        key = (tenant, intent, predictor)
        children = self._children.get(key)
        if children is None:  # labels() costs microseconds: resolve each series once
            values = (self.tenant_label(tenant), intent, predictor)
            children = (self.requests.labels(*values, "200"), self.latency.labels(*values), self.events.labels(*values))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        children[2].inc(rows)

    def observe_error(self, tenant: str, intent: str, predictor: str, code: int, reason: str) -> None:
        values = (self.tenant_label(tenant), intent, predictor)
        self.requests.labels(*values, str(code)).inc()
        self.errors.labels(*values, reason).inc()

    def observe_batch(self, model: str, rows: int, waits: list[float]) -> None:
        children = self._children.get(model)
        if children is None:
            children = self._children[model] = (self.batch_rows.labels(model), self.queue_wait.labels(model))
        children[0].observe(rows)
        for w in waits:
            children[1].observe(w)

    def render(self) -> bytes:
        if self.multiprocess:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)
