"""The plan of a calibration refresh, as pure functions of window rows, a reference and the
live maps: fit each map and judge it by the guardrails (muse.core.refresh documents them, runs
the plan against a registry and publishes it; bench/calibration_study.py runs it on a stream).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from muse.calib import Calibration, QuantileMap, Reference, SampleError, fit_quantile_map
from muse.calib.names import is_tenant
from muse.calib.quantile_map import MAX_EDGE_ERROR, reference_edges

from .spec import RefreshSpec

NEWEST_FRACTION = 0.2  # the slice of the window the guardrails judge the new map on
NOISE_SIGMAS = 3.0  # binomial standard errors allowed on top of the tolerance


@dataclass(frozen=True)
class EdgeCheck:
    edge: float
    target: float
    live: float  # alert rate on the newest slice under the live map
    new: float  # ... under the new map

    @property
    def shift(self) -> float:
        return abs(self.new - self.live) / self.target


@dataclass
class MapCheck:
    """One map of a refresh: fitted from ``rows`` window rows, judged on the ``newest`` of them."""

    tenant: str | None
    rows: int
    newest: int = 0
    edges: list[EdgeCheck] = field(default_factory=list)
    qmap: QuantileMap | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.qmap is not None and not self.problems


@dataclass
class LiveMaps:
    """The maps a predictor serves now: all-traffic and per tenant (identity when uncalibrated)."""

    overall: QuantileMap
    tenants: dict[str, QuantileMap] = field(default_factory=dict)
    calibration: Calibration | None = None
    tenant_calibrations: dict[str, Calibration] = field(default_factory=dict)

    def of(self, tenant: str | None) -> QuantileMap:
        return self.overall if tenant is None else self.tenants.get(tenant, self.overall)


@dataclass
class RefreshPlan:
    predictor: str
    rows: int
    start: datetime.datetime | None
    end: datetime.datetime | None
    overall: MapCheck
    tenants: list[MapCheck] = field(default_factory=list)
    # Tenants with too few rows for a map and none of their own: counted, not listed (tenant
    # names are the clients'; an audit record must not grow with them).
    small_tenants: int = 0

    @property
    def ok(self) -> bool:
        return self.overall.ok


def _newest(times: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The newest NEWEST_FRACTION of ``scores`` by time (at least one row)."""
    n = max(1, math.ceil(scores.size * NEWEST_FRACTION))
    order = np.argsort(times, kind="stable")
    return scores[order[-n:]]


def check_map(
    tenant: str | None,
    times: np.ndarray,
    scores: np.ndarray,
    reference: Reference,
    live: QuantileMap,
    policy: RefreshSpec,
) -> MapCheck:
    """Fit one map from ``scores`` (corrected, at ``times``) and judge it by the guardrails."""
    check = MapCheck(tenant, int(scores.size))
    if scores.size < policy.min_samples:
        check.problems.append(f"{scores.size} rows in the window, fewer than min_samples {policy.min_samples}")
        return check
    try:
        check.qmap = fit_quantile_map(scores, reference, policy.min_samples, max_edge_error=MAX_EDGE_ERROR)
    except SampleError as exc:
        check.problems.append(str(exc))
        return check
    newest = _newest(times, scores)
    check.newest = int(newest.size)
    new_mapped, live_mapped = check.qmap(newest), live(newest)
    for edge, target in reference_edges(reference):
        e = EdgeCheck(edge, target, float(np.mean(live_mapped >= edge)), float(np.mean(new_mapped >= edge)))
        check.edges.append(e)
        noise = NOISE_SIGMAS * math.sqrt(target * (1 - target) / newest.size)
        if abs(e.new - target) > policy.tolerance * target + noise:
            check.problems.append(
                f"edge {edge:g}: the new map alerts on {e.new:.4f} of the newest {newest.size} rows for a target of "
                f"{target:g}, beyond the tolerance {policy.tolerance:g} (the window mixes regimes: shorten it)"
            )
        if abs(e.new - e.live) > policy.max_shift * target + noise:
            check.problems.append(
                f"edge {edge:g}: the alert rate would move from {e.live:.4f} to {e.new:.4f} at once, "
                f"{e.shift:.0%} of the target {target:g}, beyond max_shift {policy.max_shift:g}; "
                "look at the feed, then refit by hand (`muse calib fit`) if the change is real"
            )
    return check


def plan_refresh(
    predictor: str, rows: pl.DataFrame, reference: Reference, live: LiveMaps, policy: RefreshSpec
) -> RefreshPlan:
    """Fit and judge every map of a refresh from window ``rows`` (time, tenant, corrected)."""
    times = rows["time"].cast(pl.Int64).to_numpy() if rows.height else np.zeros(0, dtype=np.int64)
    scores = rows["corrected"].cast(pl.Float64).to_numpy()
    start, end = (rows["time"].min(), rows["time"].max()) if rows.height else (None, None)
    plan = RefreshPlan(
        predictor,
        rows.height,
        start,  # type: ignore[arg-type]
        end,  # type: ignore[arg-type]
        check_map(None, times, scores, reference, live.overall, policy),
    )
    if policy.by == "tenant" and rows.height:
        grouped = (
            rows.with_row_index("i")
            .group_by(pl.col("tenant").cast(pl.String))
            .agg(pl.col("i"))
            .filter(pl.col("tenant").is_not_null())
            .sort("tenant")
        )
        for tenant, index in zip(grouped["tenant"].to_list(), grouped["i"].to_list()):
            if not is_tenant(tenant):  # what clients sent: such rows count only toward the all-traffic map
                continue
            if len(index) < policy.min_samples and tenant not in live.tenants:
                plan.small_tenants += 1
                continue
            idx = np.asarray(index, dtype=np.int64)
            plan.tenants.append(check_map(tenant, times[idx], scores[idx], reference, live.of(tenant), policy))
    return plan


def drifted_edges(mapped: np.ndarray, reference: Reference, tolerance: float) -> list[str]:
    """The edges whose alert rate over live ``mapped`` scores is off target by more than
    ``tolerance`` of the target (plus the sample's binomial noise), described."""
    off = []
    for edge, target in reference_edges(reference):
        rate = float(np.mean(mapped >= edge))
        allowed = tolerance * target + NOISE_SIGMAS * math.sqrt(target * (1 - target) / mapped.size)
        if abs(rate - target) > allowed:
            off.append(f"edge {edge:g}: {rate:.4f} for a target of {target:g}")
    return off
