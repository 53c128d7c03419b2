"""Numba kernels that apply quantile maps to batches of scores.

A map is a monotone piecewise-linear function through knots (xs, ys) with xs
strictly increasing.  Many maps are packed into one pair of flat arrays with
offsets (CSR style) so that a batch spanning tenants and predictors is
calibrated in one call, each row with its own map.

Scores below the first knot take ys[0], above the last ys[-1]; NaN stays NaN.

Lookups start from a per-map grid over the score's float bits
(128 buckets per octave from 2^-32 to 1, so dense near 0 where fraud scores
crowd).  Most buckets hold no knot, so a score's segment is one table read
away; the rest step over the few knots inside their bucket.  That replaces
eight levels of mispredicted binary-search branches (measured in
bench/calib_kernels.py: 6 ns per score against 18 ns)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numba
import numpy as np
import numpy.typing as npt

from .posterior import corrected_from_probability, sigmoid

if TYPE_CHECKING:
    from collections.abc import Iterable
    from ctypes import _Pointer, c_double, c_int16, c_int64

    from .quantile_map import QuantileMap

GRID_SHIFT = 45  # keep the exponent and 7 mantissa bits: 128 buckets per octave
GRID_BASE = (1023 - 32) << 7  # bucket 0 holds everything below 2^-32
GRID_SIZE = 32 << 7


def build_grid(xs: np.ndarray) -> np.ndarray:
    """grid[b] = index of the last knot <= the lower bound of bucket b (b in 0..GRID_SIZE)."""
    bounds = (np.arange(GRID_SIZE + 1, dtype=np.int64) + GRID_BASE) << GRID_SHIFT
    lower = bounds.view(np.float64).copy()
    lower[0] = 0.0
    if xs.size > np.iinfo(np.int16).max:
        raise ValueError(f"a quantile map may have at most {np.iinfo(np.int16).max} knots, got {xs.size}")
    # int16 keeps a map's grid at 8 KiB, so a few dozen maps stay in L2.
    grid: np.ndarray = np.clip(np.searchsorted(xs, lower, side="right") - 1, 0, xs.size - 1).astype(np.int16)
    return grid


IDENTITY, LOGIT, PROBABILITY = 0, 1, 2  # what calibrate_rows does before mapping


def correction(beta: float, margin_kind: str) -> tuple[int, float]:
    """calibrate_rows' (kind, param) for a model's raw outputs: margins ("logit") are shifted
    by ln beta, probabilities corrected with beta itself."""
    return (LOGIT, math.log(beta)) if margin_kind == "logit" else (PROBABILITY, beta)


# FMA contraction only, as in posterior.py: it lets the correction loop vectorize.
@numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})
def calibrate_rows(
    raw: np.ndarray,
    kind: int,
    param: float,
    single: int,
    map_index: np.ndarray,
    offsets: np.ndarray,
    knots: np.ndarray,
    grids: np.ndarray,
    out: np.ndarray,
) -> int:
    """Posterior correction, then each row's map, in one dispatch (at batch 1 the dispatch is
    the cost).  kind LOGIT: margins shifted by param = ln beta; PROBABILITY: param = beta;
    IDENTITY: scores mapped as they are.  Row i goes through map ``single`` if that is >= 0,
    else map_index[i]; map m's knots are knots[:, offsets[m]:offsets[m+1]] (rows: x, y, slope
    to the next knot).  Writes corrected scores to out[0], mapped to out[1].  Returns the first row
    whose map index is out of range (its mapped score left unset), or -1.

    Arrays come packed (knots, out) because Numba's dispatch costs ~0.1 us per array argument.
    The correction is its own loop so that it vectorizes; the lookup is written out in the
    mapping loop on purpose: a jitted helper, even inlined, made it 4x slower (measured)."""
    xs, ys, slopes = knots[0], knots[1], knots[2]
    corrected, mapped = out[0], out[1]
    if kind == LOGIT:
        for i in range(raw.shape[0]):
            corrected[i] = sigmoid(raw[i] + param)
    elif kind == PROBABILITY:
        for i in range(raw.shape[0]):
            corrected[i] = corrected_from_probability(raw[i], param)
    else:
        corrected[:] = raw
    maps = offsets.shape[0] - 1
    for i in range(raw.shape[0]):
        s = corrected[i]
        m = single if single >= 0 else map_index[i]
        if m < 0 or m >= maps:
            return i
        lo = offsets[m]
        hi = offsets[m + 1]
        if s >= xs[hi - 1]:
            mapped[i] = ys[hi - 1]
        elif s > xs[lo]:
            key = (np.float64(s).view(np.int64) >> GRID_SHIFT) - GRID_BASE
            key = min(max(key, 0), GRID_SIZE - 1)
            g = m * (GRID_SIZE + 1) + key
            a = lo + np.int64(grids[g])  # last knot <= bucket start <= s
            last = lo + np.int64(grids[g + 1])  # last knot <= bucket end
            while a < last and xs[a + 1] <= s:  # only buckets holding a knot step at all
                a += 1
            mapped[i] = ys[a] + (s - xs[a]) * slopes[a]
        else:
            mapped[i] = ys[lo] if s == s else s  # below the first knot; NaN stays NaN
    return -1


# The same kernel as a C function, for callers that hold no GIL (the native model thread) or
# cannot afford a Numba dispatch (~10 us in the server, for 9 arguments): compile/_library.pyx
# calls it through ``calibrate_rows_c.address`` with this signature.  The scores are read from
# ``raw`` and written to ``out`` as [2, n] (corrected, mapped); ``index`` is read only when
# ``single`` < 0; the table is MapTable's arrays.
CALIBRATE_ROWS_C_SIGNATURE = (
    "int64(CPointer(float64), int64, int64, float64, int64, CPointer(int64),"
    " CPointer(int64), int64, CPointer(float64), int64, CPointer(int16), CPointer(float64))"
)


# The ignore: Numba's type stub for cfunc lacks the nopython option, which it accepts at run time.
@numba.cfunc(CALIBRATE_ROWS_C_SIGNATURE, nopython=True, cache=True, error_model="numpy")  # type: ignore[call-arg]
def calibrate_rows_c(
    raw: _Pointer[c_double],
    n: int,
    kind: int,
    param: float,
    single: int,
    index: _Pointer[c_int64],
    offsets: _Pointer[c_int64],
    maps: int,
    knots: _Pointer[c_double],
    nknots: int,
    grids: _Pointer[c_int16],
    out: _Pointer[c_double],
) -> int:
    return calibrate_rows(
        numba.carray(raw, (n,)),
        kind,
        param,
        single,
        numba.carray(index, (n if single < 0 else 0,)),
        numba.carray(offsets, (maps + 1,)),
        numba.carray(knots, (3, nknots)),
        numba.carray(grids, (maps * (GRID_SIZE + 1),)),
        numba.carray(out, (2, n)),
    )


_NO_INDEX = np.zeros(0, dtype=np.int64)


class MapTable:
    """Many quantile maps packed for the mixed-batch kernels.  Immutable."""

    __slots__ = ("knots", "offsets", "grids")

    def __init__(self, maps: Iterable[QuantileMap]) -> None:
        maps = list(maps)
        self.offsets = np.zeros(len(maps) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([len(m.xs) for m in maps])
        # Rows: x, y, and the slope to the next knot (0 after each map's last), which spares a
        # division per score.
        self.knots = np.zeros((3, 0))
        if maps:
            self.knots = np.stack(
                [
                    np.concatenate([m.xs for m in maps]),
                    np.concatenate([m.ys for m in maps]),
                    np.concatenate([np.append(np.diff(m.ys) / np.diff(m.xs), 0.0) for m in maps]),
                ]
            )
        grids = [build_grid(m.xs) for m in maps]
        self.grids = np.concatenate(grids) if grids else np.zeros(0, dtype=np.int16)
        for arr in (self.knots, self.offsets, self.grids):
            arr.setflags(write=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _index(self, map_index: npt.ArrayLike, rows: int) -> tuple[int, np.ndarray]:
        """(single, per-row indices): an int picks one map for every row without building an array."""
        if isinstance(map_index, (int, np.integer)):
            if not 0 <= map_index < len(self):
                raise IndexError(f"map index must be in [0, {len(self)}), got {map_index}")
            return int(map_index), _NO_INDEX
        idx = np.ascontiguousarray(map_index, dtype=np.int64)
        if idx.shape != (rows,):
            raise ValueError(f"scores ({rows},) and map_index {idx.shape} differ in shape")
        return -1, idx

    def apply(self, scores: npt.ArrayLike, map_index: npt.ArrayLike) -> np.ndarray:
        """Scores through the maps: ``map_index`` is one map for all rows (an int) or one per row."""
        s = np.ascontiguousarray(scores, dtype=np.float64)
        if s.ndim != 1:
            raise ValueError(f"scores must be one-dimensional, got shape {s.shape}")
        return self._run(s, IDENTITY, 0.0, map_index, None)[1]

    def calibrate(
        self, raw: npt.ArrayLike, map_index: npt.ArrayLike, beta: float, margin_kind: str, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(corrected, mapped) for one model's raw outputs; ``map_index`` is one map for all rows
        (an int) or one per row.  ``out`` may pass a preallocated float64 [2, rows] array to reuse."""
        kind, param = correction(beta, margin_kind)
        return self._run(np.ascontiguousarray(raw, dtype=np.float64), kind, param, map_index, out)

    def _run(
        self, raw: np.ndarray, kind: int, param: float, map_index: npt.ArrayLike, out: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        single, idx = self._index(map_index, raw.shape[0])
        if out is None:
            out = np.empty((2, raw.shape[0]))
        bad = calibrate_rows(raw, kind, param, single, idx, self.offsets, self.knots, self.grids, out)
        if bad >= 0:
            raise IndexError(f"map_index[{bad}] = {idx[bad]}: must be in [0, {len(self)})")
        return out[0], out[1]
