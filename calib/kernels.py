"""Numba kernels that apply quantile maps to batches of scores.

A map is a monotone piecewise-linear function through knots (xs, ys) with xs
strictly increasing.  Many maps are packed into one pair of flat arrays with
offsets (CSR style) so that a batch spanning tenants and predictors is
calibrated in one call, each row with its own map.

Lookup is a binary search inside the map's knots.  Scores below the first
knot take ys[0], above the last ys[-1]; NaN stays NaN."""
from __future__ import annotations

import math

import numba
import numpy as np

from .posterior import sigmoid


@numba.njit(nogil=True, cache=True, inline="always")
def interpolate(s: float, xs, ys, lo: int, hi: int) -> float:
    """Map value of s through knots xs[lo:hi], ys[lo:hi]."""
    if not (s > xs[lo]):
        return ys[lo] if s == s else s
    if s >= xs[hi - 1]:
        return ys[hi - 1]
    a, b = lo, hi - 1  # invariant: xs[a] < s <= xs[b]
    while b - a > 1:
        mid = (a + b) >> 1
        if xs[mid] < s:
            a = mid
        else:
            b = mid
    t = (s - xs[a]) / (xs[b] - xs[a])
    return ys[a] + t * (ys[b] - ys[a])


@numba.njit(nogil=True, cache=True)
def apply_map(scores, xs, ys, out):
    n = xs.shape[0]
    for i in range(scores.shape[0]):
        out[i] = interpolate(scores[i], xs, ys, 0, n)


@numba.njit(nogil=True, cache=True)
def apply_maps(scores, map_index, offsets, xs, ys, out):
    """Row i goes through map map_index[i], whose knots are xs[offsets[m]:offsets[m+1]]."""
    for i in range(scores.shape[0]):
        m = map_index[i]
        out[i] = interpolate(scores[i], xs, ys, offsets[m], offsets[m + 1])


@numba.njit(nogil=True, cache=True)
def calibrate_margins(margins, log_beta, map_index, offsets, xs, ys, corrected, mapped):
    """Fused level 1 + level 2 for logit margins: one pass, two outputs."""
    for i in range(margins.shape[0]):
        p = sigmoid(margins[i] + log_beta)
        corrected[i] = p
        m = map_index[i]
        mapped[i] = interpolate(p, xs, ys, offsets[m], offsets[m + 1])


@numba.njit(nogil=True, cache=True)
def calibrate_probabilities(probs, beta, map_index, offsets, xs, ys, corrected, mapped):
    """Fused level 1 + level 2 for models whose raw output is a probability."""
    for i in range(probs.shape[0]):
        p = probs[i]
        p = beta * p / (1.0 - (1.0 - beta) * p)
        corrected[i] = p
        m = map_index[i]
        mapped[i] = interpolate(p, xs, ys, offsets[m], offsets[m + 1])


class MapTable:
    """Many quantile maps packed for the mixed-batch kernels.  Immutable."""

    __slots__ = ("xs", "ys", "offsets")

    def __init__(self, maps):
        maps = list(maps)
        sizes = [len(m.xs) for m in maps]
        self.offsets = np.zeros(len(maps) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum(sizes)
        self.xs = np.concatenate([m.xs for m in maps]) if maps else np.zeros(0)
        self.ys = np.concatenate([m.ys for m in maps]) if maps else np.zeros(0)
        for arr in (self.xs, self.ys, self.offsets):
            arr.setflags(write=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def apply(self, scores: np.ndarray, map_index: np.ndarray) -> np.ndarray:
        s = np.ascontiguousarray(scores, dtype=np.float64)
        idx = np.ascontiguousarray(map_index, dtype=np.int64)
        if s.shape != idx.shape:
            raise ValueError(f"scores {s.shape} and map_index {idx.shape} differ in shape")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"map_index must be in [0, {len(self)})")
        out = np.empty_like(s)
        apply_maps(s, idx, self.offsets, self.xs, self.ys, out)
        return out

    def calibrate(self, raw: np.ndarray, map_index: np.ndarray, beta: float, margin_kind: str):
        """(corrected, mapped) for one model's raw outputs, each row with its own map."""
        raw = np.ascontiguousarray(raw, dtype=np.float64)
        idx = np.ascontiguousarray(map_index, dtype=np.int64)
        corrected = np.empty_like(raw)
        mapped = np.empty_like(raw)
        if margin_kind == "logit":
            calibrate_margins(raw, math.log(beta), idx, self.offsets, self.xs, self.ys, corrected, mapped)
        else:
            calibrate_probabilities(raw, beta, idx, self.offsets, self.xs, self.ys, corrected, mapped)
        return corrected, mapped
