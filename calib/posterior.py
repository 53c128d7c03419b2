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


@numba.njit(nogil=True, cache=True, inline="always")
def sigmoid(z: float) -> float:
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@numba.njit(nogil=True, cache=True, inline="always")
def corrected_from_probability(p: float, beta: float) -> float:
    return beta * p / (1.0 - (1.0 - beta) * p)


@numba.njit(nogil=True, cache=True)
def _correct_margins(margins, log_beta, out):
    for i in range(margins.shape[0]):
        out[i] = sigmoid(margins[i] + log_beta)


@numba.njit(nogil=True, cache=True)
def _correct_probabilities(probs, beta, out):
    for i in range(probs.shape[0]):
        out[i] = corrected_from_probability(probs[i], beta)


@numba.njit(nogil=True, cache=True)
def _undo_probabilities(probs, beta, out):
    for i in range(probs.shape[0]):
        p = probs[i]
        out[i] = p / (beta + (1.0 - beta) * p)


def correct_margins(margins: np.ndarray, beta: float) -> np.ndarray:
    """Corrected probabilities from raw margins (log-odds) of an undersampled model."""
    m = np.ascontiguousarray(margins, dtype=np.float64)
    out = np.empty_like(m)
    _correct_margins(m.reshape(-1), math.log(check_beta(beta)), out.reshape(-1))
    return out


def correct_probabilities(probs: np.ndarray, beta: float) -> np.ndarray:
    """Corrected probabilities from an undersampled model's probabilities."""
    p = np.ascontiguousarray(probs, dtype=np.float64)
    out = np.empty_like(p)
    _correct_probabilities(p.reshape(-1), check_beta(beta), out.reshape(-1))
    return out


def undo_correction(probs: np.ndarray, beta: float) -> np.ndarray:
    """The inverse of :func:`correct_probabilities`: back to the training-sample scale."""
    p = np.ascontiguousarray(probs, dtype=np.float64)
    out = np.empty_like(p)
    _undo_probabilities(p.reshape(-1), check_beta(beta), out.reshape(-1))
    return out
