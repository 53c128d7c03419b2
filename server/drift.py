"""Live drift monitoring: per (tenant, intent, predictor), the share of the
last ``window`` mapped scores at or above each reference edge, next to the
share the reference promises.  A calibration that still holds keeps the two
close; a drifting population or a stale map pulls them apart.

Scores go into a fixed ring per series (a copy into a preallocated array on
the request path); the rates are computed when /metrics is scraped."""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import Gauge

from muse.calib import Reference

TAIL_RATES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001)


def monitor_edges(reference: Reference, max_edges: int = len(TAIL_RATES)) -> list[tuple[float, float]]:
    """The (edge, target rate) pairs to watch: all of an alert-rate curve's, or for a
    quantile table the entries nearest the usual tail rates."""
    pairs = reference.edge_rates()
    if len(pairs) <= max_edges:
        return pairs
    rates = np.array([r for _, r in pairs])
    chosen = sorted({int(np.argmin(np.abs(rates - t))) for t in TAIL_RATES})
    return [pairs[i] for i in chosen]


class _Ring:
    __slots__ = ("values", "next", "full")

    def __init__(self, size: int):
        self.values = np.empty(size)
        self.next = 0
        self.full = False

    def add(self, scores: np.ndarray) -> None:
        size = self.values.size
        scores = scores[-size:]
        end = self.next + scores.size
        if end <= size:
            self.values[self.next : end] = scores
        else:
            split = size - self.next
            self.values[self.next :] = scores[:split]
            self.values[: end - size] = scores[split:]
        self.full = self.full or end >= size
        self.next = end % size

    def current(self) -> np.ndarray:
        return self.values if self.full else self.values[: self.next]


class DriftMonitor:
    def __init__(self, registry, tenant_label, window: int = 10_000, gauge_kwargs: dict | None = None):
        kw = gauge_kwargs or {}
        self.rate = Gauge(
            "muse_alert_rate",
            "Share of the last window's mapped scores at or above the edge.",
            ["tenant", "intent", "predictor", "edge"],
            registry=registry,
            **kw,
        )
        self.target = Gauge(
            "muse_alert_rate_target",
            "Share the intent's reference promises at or above the edge.",
            ["intent", "edge"],
            registry=registry,
            **kw,
        )
        self.samples = Gauge(
            "muse_alert_rate_window",
            "Scores in the drift window.",
            ["tenant", "intent", "predictor"],
            registry=registry,
            **kw,
        )
        self.window = window
        self.tenant_label = tenant_label
        self._rings: dict[tuple[str, str, str], _Ring] = {}
        self._lock = threading.Lock()

    def observe(self, tenant: str, intent: str, predictor: str, mapped: np.ndarray) -> None:
        key = (self.tenant_label(tenant), intent, predictor)
        with self._lock:
            ring = self._rings.get(key)
            if ring is None:
                ring = self._rings[key] = _Ring(self.window)
            ring.add(mapped)

    def update(self, edges: dict[str, list[tuple[float, float]]]) -> None:
        """Refresh the gauges from the rings; ``edges`` maps intent -> (edge, target) pairs."""
        for intent, pairs in edges.items():
            for edge, target in pairs:
                self.target.labels(intent, f"{edge:g}").set(target)
        with self._lock:
            snapshot = {key: ring.current().copy() for key, ring in self._rings.items()}
        for (tenant, intent, predictor), scores in snapshot.items():
            self.samples.labels(tenant, intent, predictor).set(scores.size)
            if scores.size == 0:
                continue
            for edge, _ in edges.get(intent, []):
                self.rate.labels(tenant, intent, predictor, f"{edge:g}").set(float(np.mean(scores >= edge)))
