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
* Outside the fitted range the map runs linearly to (0, 0) below the smallest
  sample and to (1, 1) above the largest, so new extremes keep their order
  and every output lies in [0, 1].
* Samples smaller than ``min_samples`` (default 1000) and samples containing
  NaN or values outside [0, 1] are refused with a message.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .kernels import MapTable
from .reference import Reference, inverse_cdf

DEFAULT_MIN_SAMPLES = 1000
UNIFORM_LEVELS = 64
TAIL_LEVELS = 64


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
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
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
    scores: npt.ArrayLike, reference: Reference, min_samples: int = DEFAULT_MIN_SAMPLES
) -> QuantileMap:
    """Fit mapped = F_ref^-1(F_m) from a sample of corrected scores.  Deterministic."""
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
    return QuantileMap(x, np.clip(y, 0.0, 1.0))


def alert_rates(mapped_scores: npt.ArrayLike, edges: npt.ArrayLike) -> np.ndarray:
    """Fraction of scores at or above each edge."""
    s = np.sort(np.asarray(mapped_scores, dtype=np.float64))
    edges = np.asarray(edges, dtype=np.float64)
    rates: np.ndarray = (s.size - np.searchsorted(s, edges, side="left")) / max(s.size, 1)
    return rates
