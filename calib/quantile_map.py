"""Level 2: quantile mapping  mapped(s) = F_ref^-1(F_m(s)).

F_m is estimated from a sample of corrected scores (no labels needed).  The
fitted map is a monotone piecewise-linear function through K+1 knots
(x_k = sample quantile at level q_k, y_k = F_ref^-1(q_k)).

Defined behaviour (each is tested):

* Knot levels: 65 uniform levels, 64 levels geometric in the upper tail
  (1 - q from 0.5 down to 1/n: where fraud thresholds live), every
  probability at which the reference has a knot and the sample values on
  either side of it, so each reference edge is hit exactly.
* Sample quantiles use Hazen plotting positions, F_m(s_(i)) = (i - 1/2) / n,
  so neither the smallest nor the largest sample is pinned to 0 or 1.
* Ties / point masses: a value that occurs m > 1 times becomes one knot at
  the middle of its probability interval, F = (#below + #at-or-below) / 2n
  (the mid-distribution function).  All tied scores map to the same value.
  Where a tie holds a reference level, the sample values just below and
  just above it are knots too, so a tie that straddles an edge lands
  wholly on the side nearer its middle: the achieved alert rate is the
  tie's boundary nearest the target, the best any monotone map can do.
* Unreachable edges: a tie can make an edge's target rate unreachable (a
  sample of one distinct value alerts on all events or none).
  :func:`edge_misses` lists the edges whose achieved in-sample rate is off
  the target by more than ``tolerance * target + 1/n`` (1/n: the step of a
  rate measured on n scores, the most a tie-free sample misses by);
  ``fit_quantile_map(..., max_edge_error=...)`` refuses such a sample.
* Outside the fitted range the map runs linearly to (0, 0) below the smallest
  sample and to (1, 1) above the largest, so new extremes keep their order
  and every output lies in [0, 1].
* Samples smaller than ``min_samples`` (default 1000; at least 1), empty
  samples and samples containing NaN or values outside [0, 1] are refused
  with a message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .kernels import MapTable
from .reference import Reference, inverse_cdf

DEFAULT_MIN_SAMPLES = 1000
UNIFORM_LEVELS = 64
TAIL_LEVELS = 64
# A map whose in-sample alert rate at an edge is off its target by more than this fraction of
# the target (plus 1/n) is refused by `muse calib fit`: no threshold at that edge means what
# the reference says, and `muse calib status` would call it drifted from the first event.
MAX_EDGE_ERROR = 0.5


class SampleError(ValueError):
    """A score sample that cannot support a fit."""


class QuantileMap:
    """A fitted map: plain arrays, xs strictly increasing, ys non-decreasing in [0, 1]."""

    __slots__ = ("xs", "ys", "_table")

    def __init__(self, xs: npt.ArrayLike, ys: npt.ArrayLike) -> None:
        xs = np.ascontiguousarray(xs, dtype=np.float64)
        ys = np.ascontiguousarray(ys, dtype=np.float64)
        if xs.ndim != 1 or xs.shape != ys.shape or xs.size < 2:
            raise ValueError("a quantile map needs two equal-length 1-D knot arrays of at least 2 knots")
        if np.isnan(xs).any() or np.isnan(ys).any():
            raise ValueError("quantile map knots contain NaN")
        if not (np.diff(xs) > 0).all():
            raise ValueError("quantile map knots xs must be strictly increasing")
        if not (np.diff(ys) >= 0).all() or ys[0] < 0 or ys[-1] > 1:
            raise ValueError("quantile map values ys must be non-decreasing within [0, 1]")
        xs.setflags(write=False)
        ys.setflags(write=False)
        self.xs, self.ys = xs, ys
        self._table: MapTable | None = None

    def __call__(self, scores: npt.ArrayLike) -> np.ndarray:
        if self._table is None:
            self._table = MapTable([self])
        s = np.ascontiguousarray(scores, dtype=np.float64)
        flat = s.reshape(-1)
        return self._table.apply(flat, 0).reshape(s.shape)

    def __len__(self) -> int:
        return self.xs.size

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, QuantileMap) and np.array_equal(self.xs, other.xs) and np.array_equal(self.ys, other.ys)
        )

    def __repr__(self) -> str:
        return f"QuantileMap({self.xs.size} knots, x in [{self.xs[0]:.4g}, {self.xs[-1]:.4g}])"


def identity_map() -> QuantileMap:
    return QuantileMap([0.0, 1.0], [0.0, 1.0])


def knot_levels(n: int, reference: Reference) -> np.ndarray:
    uniform = np.linspace(0.0, 1.0, UNIFORM_LEVELS + 1)
    tail = 1.0 - np.geomspace(0.5, 1.0 / n, TAIL_LEVELS)
    ref_p, _ = reference.knots()
    # The order statistics on either side of each reference level are knots too,
    # so no interpolated segment straddles an edge (or a jump of F_ref^-1).
    pos = ref_p * n - 0.5
    base = np.floor(pos)
    neighbours = (np.concatenate([base - 1, base, base + 1]) + 0.5) / n
    return np.unique(np.clip(np.concatenate([uniform, tail, ref_p, neighbours]), 0.0, 1.0))


def check_sample(
    scores: npt.ArrayLike, min_samples: int = DEFAULT_MIN_SAMPLES, what: str = "score sample"
) -> np.ndarray:
    if isinstance(min_samples, bool) or not isinstance(min_samples, (int, np.integer)) or min_samples < 1:
        raise ValueError(f"min_samples must be a whole number >= 1, got {min_samples!r}")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise SampleError(f"{what} is empty")
    nan = int(np.isnan(s).sum())
    if nan:
        raise SampleError(f"{what} has {nan} NaN scores; drop or fix them before fitting")
    if s.size < min_samples:
        raise SampleError(
            f"{what} has {s.size} scores, fewer than the minimum {min_samples}; "
            "collect more traffic or lower min_samples"
        )
    if s.size and (s.min() < 0.0 or s.max() > 1.0):
        raise SampleError(
            f"{what} has scores outside [0, 1] (min {s.min():.4g}, max {s.max():.4g}); "
            "fit on corrected probabilities, not raw margins"
        )
    return s


def fit_quantile_map(
    scores: npt.ArrayLike,
    reference: Reference,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    max_edge_error: float | None = None,
) -> QuantileMap:
    """Fit mapped = F_ref^-1(F_m) from a sample of corrected scores.  Deterministic.

    With ``max_edge_error``, a sample whose ties leave a reference edge's alert rate off its
    target by more than that fraction of the target (plus 1/n) is refused (SampleError naming
    the edge, the tie and the rate reached); see :func:`edge_misses`."""
    reference.validate()
    s = np.sort(check_sample(scores, min_samples))
    n = s.size
    q = knot_levels(n, reference)
    # Hazen positions: level q sits at 0-based order-statistic position q*n - 1/2.
    pos = np.clip(q * n - 0.5, 0.0, n - 1.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    x = s[lo] + (pos - lo) * (s[hi] - s[lo])
    level = np.clip(q, 0.5 / n, 1.0 - 0.5 / n)  # levels past the extremes collapse onto them
    # A tie holding a reference level swallows the order statistics next to that level: the
    # sample values on either side of the tie become knots instead (see the module notes).
    ref_p, _ = reference.knots()
    ref_p = ref_p[(ref_p > 0.0) & (ref_p < 1.0)]  # the anchors (0, 0) and (1, 1) are no edges
    at_ref = s[np.clip(np.floor(ref_p * n - 0.5), 0, n - 1).astype(np.int64)]
    first_at, past_at = np.searchsorted(s, at_ref, side="left"), np.searchsorted(s, at_ref, side="right")
    tied = past_at - first_at > 1  # without a tie those neighbours are knots already
    beside = s[np.concatenate([np.maximum(first_at[tied] - 1, 0), np.minimum(past_at[tied], n - 1)])]
    x = np.concatenate([x, beside])
    level = np.concatenate([level, np.zeros(beside.size)])  # sample values: their level is set below
    # Knots that sit on a sample value take that value's mid-distribution level;
    # for a value seen once this equals its Hazen level, for a tie its middle.
    below = np.searchsorted(s, x, side="left")
    at_or_below = np.searchsorted(s, x, side="right")
    on_sample = at_or_below > below
    level = np.where(on_sample, (below + at_or_below) / (2.0 * n), level)
    x, first = np.unique(x, return_index=True)
    level = np.maximum.accumulate(level[first])
    y = np.maximum.accumulate(inverse_cdf(reference, level))
    if x[0] > 0.0:
        x, y = np.concatenate([[0.0], x]), np.concatenate([[0.0], y])
    if x[-1] < 1.0:
        x, y = np.concatenate([x, [1.0]]), np.concatenate([y, [1.0]])
    qmap = QuantileMap(x, np.clip(y, 0.0, 1.0))
    if max_edge_error is not None:
        misses = edge_misses(s, qmap, reference, max_edge_error)
        if misses:
            raise SampleError(max(misses, key=lambda m: m.error).describe())
    return qmap


@dataclass(frozen=True)
class EdgeMiss:
    """A reference edge whose in-sample alert rate is off its target beyond a tolerance, and
    the tie that holds the target's level (the reason: a tie maps to one value, so its events
    alert together)."""

    edge: float
    target: float  # fraction of events that should score at or above the edge
    achieved: float  # fraction of the sample the map puts at or above it
    tolerance: float  # the fraction of the target allowed (plus 1/size)
    size: int  # scores in the sample
    distinct: int  # distinct scores in the sample
    tied_value: float  # the sample value at the target's level
    tied_count: int  # how many scores equal it

    @property
    def error(self) -> float:
        """|achieved - target| as a fraction of the target."""
        return abs(self.achieved - self.target) / self.target

    def reason(self) -> str:
        if self.distinct == 1:
            return f"the sample's {self.size} scores take 1 distinct value ({self.tied_value:.6g})"
        share = self.tied_count / self.size
        return f"{share:.1%} of the sample's {self.size} scores are tied at {self.tied_value:.6g}"

    def describe(self) -> str:
        return (
            f"{self.reason()}; the map cannot reach alert rate {self.target:g} at edge {self.edge:g} "
            f"(the nearest a monotone map gets is {self.achieved:.4f}, {self.error:.0%} off, beyond "
            f"{self.tolerance:.0%}); fit on scores that vary (is the model or its input constant?)"
        )


def reference_edges(reference: Reference) -> list[tuple[float, float]]:
    """(edge, target alert rate) for the edges a map can be judged at: inside (0, 1), one per
    edge value (a reference point mass lists a value twice; at or above it is the larger rate)."""
    best: dict[float, float] = {}
    for edge, rate in reference.edge_rates():
        if 0.0 < edge < 1.0 and rate > 0.0:
            best[edge] = max(rate, best.get(edge, 0.0))
    return sorted(best.items())


def edge_misses(scores: npt.ArrayLike, qmap: QuantileMap, reference: Reference, tolerance: float) -> list[EdgeMiss]:
    """The edges where ``qmap`` applied to ``scores`` (its fitting sample) alerts on a fraction
    further from the target than ``tolerance * target + 1/n``.  On a sample without ties the
    fit is within 1/n of every target, so only ties (point masses) put an edge here."""
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    n = s.size
    if n == 0:
        return []
    edges = reference_edges(reference)
    achieved = alert_rates(qmap(s), [e for e, _ in edges])
    distinct = int(np.count_nonzero(np.diff(s))) + 1
    misses = []
    for (edge, target), got in zip(edges, achieved):
        if abs(got - target) <= tolerance * target + 1.0 / n + 1e-12:
            continue
        value = s[min(int((1.0 - target) * n), n - 1)]
        count = int(np.searchsorted(s, value, side="right") - np.searchsorted(s, value, side="left"))
        misses.append(EdgeMiss(edge, target, float(got), tolerance, n, distinct, float(value), count))
    return misses


def alert_rates(mapped_scores: npt.ArrayLike, edges: npt.ArrayLike) -> np.ndarray:
    """Fraction of scores at or above each edge."""
    s = np.sort(np.asarray(mapped_scores, dtype=np.float64))
    edges = np.asarray(edges, dtype=np.float64)
    rates: np.ndarray = (s.size - np.searchsorted(s, edges, side="left")) / max(s.size, 1)
    return rates
