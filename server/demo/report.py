"""The demo's tables: per tenant, the alert rate at each reference edge against its
target and, where labels are known, the share of frauds caught there (recall).
They are built as data (the demo's result, which tests check) and printed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from muse.calib import AlertRateCurve, MapTable, alert_rates
from muse.core.registry import Registry


@dataclasses.dataclass
class TenantRates:
    tenant: str
    label: str  # which model's scores, e.g. "v1"
    events: int
    frauds: int
    rates: list[float]  # alert rate at each edge
    recall: list[float]  # frauds scored at or above each edge / frauds


@dataclasses.dataclass
class RateTable:
    intent: str
    edges: list[float]
    targets: list[float]  # the reference's alert rate at each edge
    rows: list[TenantRates]

    def row(self, tenant: str, label: str) -> TenantRates:
        return next(r for r in self.rows if r.tenant == tenant and r.label == label)


def rate_table(
    intent: str,
    curve: AlertRateCurve,
    scores: Mapping[str, np.ndarray],
    y: np.ndarray,
    tenants: np.ndarray,
    names: list[str],
) -> RateTable:
    """``scores``: label -> score per event of ``y``/``tenants``; one row per tenant and label."""
    edges = [float(e) for e in curve.edges]
    rows = []
    for tenant in names:
        sel = tenants == tenant
        frauds = y[sel] == 1
        for label, s in scores.items():
            s = s[sel]
            rows.append(
                TenantRates(
                    tenant,
                    label,
                    int(sel.sum()),
                    int(frauds.sum()),
                    [float(r) for r in alert_rates(s, curve.edges)],
                    [float(((s >= e) & frauds).sum() / max(int(frauds.sum()), 1)) for e in edges],
                )
            )
    return RateTable(intent, edges, [float(t) for t in curve.rates], rows)


def format_table(table: RateTable, recall: bool = False) -> str:
    head = f"intent {table.intent!r}: alert rate at each edge [target]" + ("; recall at each edge" if recall else "")
    lines = [head]
    for r in table.rows:
        line = f"  {r.tenant:<11} {r.label:<3} " + " ".join(
            f">={e:g}: {a:.3f} [{t:.2f}]" for e, a, t in zip(table.edges, r.rates, table.targets)
        )
        if recall:
            line += f"   recall ({r.frauds} frauds) " + " ".join(f"{x:.2f}" for x in r.recall)
        lines.append(line)
    return "\n".join(lines)


def offline_scores(reg: Registry, model: str, calibration: str, X: np.ndarray, tenants: np.ndarray) -> np.ndarray:
    """What a predictor of ``model`` with per-tenant maps ``calibration`` answers, computed
    here: the same compiled library and the same maps, applied to the same events."""
    compiled = reg.load_model(model)
    m = compiled.manifest
    names = reg.calibration_tenants(calibration)
    table = MapTable([reg.load_calibration(calibration, tenant=t).quantile_map() for t in names])
    index = np.array([names.index(t) for t in tenants])
    return table.calibrate(compiled.predict(X, margin=True), index, m.beta, m.margin_kind)[1]
