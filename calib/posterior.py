"""Level 1: posterior correction for negative undersampling (Dal Pozzolo et al. 2015).

A model trained on data whose negatives were kept with probability beta
outputs p_s; the probability on the real population is

    p = beta * p_s / (1 - (1 - beta) * p_s),  i.e.  logit(p) = logit(p_s) + ln(beta).

From a margin (logit) the correction is an exact additive shift, so that is
the preferred entry point; the probability form serves models whose raw
output is already a probability (random forests)."""

from __future__ import annotations

import math

import numba
import numpy as np


def check_beta(beta: float) -> float:
    beta = float(beta)
    if not (0.0 < beta <= 1.0) or math.isnan(beta):
        raise ValueError(f"beta (negative keep-rate) must be in (0, 1], got {beta}")
    return beta


_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact (fdlibm)
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00


@numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")
def sigmoid(z: float) -> float:
    """1 / (1 + exp(-z)) within 2 ulp of libm, written so LLVM can vectorize it.

    libm's exp is an opaque call that keeps the batch loop scalar (6.6 ns per
    score here); this range-reduced polynomial vectorizes and runs at 2.4 ns.  exp(-z) is
    clamped to [2^-1022, 2^1023): results differ from libm's only where
    both are within 1e-307 of 0 or 1."""
    w = min(max(-z, -708.0), 709.0)
    k = np.floor(w * _INV_LN2 + 0.5)
    r = (w - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln2 / 2
    # Taylor series to degree 13: truncation error below 1e-17 on that interval.
    # fmt: off
    p = 1.0 + r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r * (
        1 / 5040 + r * (1 / 40320 + r * (1 / 362880 + r * (1 / 3628800 + r * (1 / 39916800 + r * (
            1 / 479001600 + r * (1 / 6227020800)))))))))))))
    # fmt: on
    e: float = p * np.int64((np.int64(k) + 1023) << 52).view(np.float64)
    return 1.0 / (1.0 + e)


@numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")
def corrected_from_probability(p: float, beta: float) -> float:
    return beta * p / (1.0 - (1.0 - beta) * p)


# FMA contraction only (no other fast-math): it vectorizes the polynomial.
@numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})
def correct_margins_into(margins: np.ndarray, log_beta: float, out: np.ndarray) -> None:
    for i in range(margins.shape[0]):
        out[i] = sigmoid(margins[i] + log_beta)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def correct_probabilities_into(probs: np.ndarray, beta: float, out: np.ndarray) -> None:
    for i in range(probs.shape[0]):
        out[i] = corrected_from_probability(probs[i], beta)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _undo_probabilities(probs: np.ndarray, beta: float, out: np.ndarray) -> None:
    for i in range(probs.shape[0]):
        p = probs[i]
        out[i] = p / (beta + (1.0 - beta) * p)


def correct_margins(margins: np.ndarray, beta: float) -> np.ndarray:
    """Corrected probabilities from raw margins (log-odds) of an undersampled model."""
    m = np.ascontiguousarray(margins, dtype=np.float64)
    out = np.empty_like(m)
    correct_margins_into(m.reshape(-1), math.log(check_beta(beta)), out.reshape(-1))
    return out


def correct_probabilities(probs: np.ndarray, beta: float) -> np.ndarray:
    """Corrected probabilities from an undersampled model's probabilities."""
    p = np.ascontiguousarray(probs, dtype=np.float64)
    out = np.empty_like(p)
    correct_probabilities_into(p.reshape(-1), check_beta(beta), out.reshape(-1))
    return out


def undo_correction(probs: np.ndarray, beta: float) -> np.ndarray:
    """The inverse of :func:`correct_probabilities`: back to the training-sample scale."""
    p = np.ascontiguousarray(probs, dtype=np.float64)
    out = np.empty_like(p)
    _undo_probabilities(p.reshape(-1), check_beta(beta), out.reshape(-1))
    return out
