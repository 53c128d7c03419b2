"""Reference distributions: the stable target every model of an intent maps onto.

Both kinds reduce to the same thing, the reference quantile function
F_ref^-1 as a monotone piecewise-linear curve through (probability, score)
knots:

* an alert-rate curve {edge: rate} says a fraction `rate` of events should
  score at or above `edge`, i.e. F_ref^-1(1 - rate) = edge; between edges the
  curve is linear, and it is anchored at (0, 0) and (1, 1);
* a quantile table lists F_ref^-1 directly (for instance the deciles and top
  percentiles of an incumbent model's scores).

Where two edges share a rate the curve jumps; a score at exactly that
quantile takes the higher edge, so the alert rate at every edge holds."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import numpy.typing as npt

from .names import LimitError, parse_document

# Closer edges cannot be told apart after interpolation in float64 arithmetic.
MIN_EDGE_GAP = 1e-6


class ReferenceError(ValueError):
    """A reference distribution that violates its invariants."""


def _anchored(p: list[float], v: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(probability, score) knots of a reference, pinned to (0, 0) and (1, 1) where they stop short."""
    if p[0] > 0.0:
        p, v = [0.0, *p], [0.0, *v]
    if p[-1] < 1.0:
        p, v = [*p, 1.0], [*v, 1.0]
    return np.array(p), np.array(v)


class AlertRateCurve(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="alert_rate"):
    edges: list[float]
    rates: list[float]

    def validate(self) -> AlertRateCurve:
        if not self.edges:
            raise ReferenceError("alert-rate curve needs at least one edge")
        if len(self.edges) != len(self.rates):
            raise ReferenceError(f"alert-rate curve has {len(self.edges)} edges but {len(self.rates)} rates")
        for i, (e, r) in enumerate(zip(self.edges, self.rates)):
            if not (0.0 < e < 1.0):
                raise ReferenceError(f"edges[{i}] = {e} must lie strictly between 0 and 1")
            if not (0.0 < r <= 1.0):
                raise ReferenceError(f"rates[{i}] = {r} (at edge {e}) must be in (0, 1]")
            if i and e <= self.edges[i - 1]:
                raise ReferenceError(f"edges[{i}] = {e} must be greater than edges[{i - 1}] = {self.edges[i - 1]}")
            if i and e - self.edges[i - 1] < MIN_EDGE_GAP:
                raise ReferenceError(f"edges[{i}] = {e} is within {MIN_EDGE_GAP} of edges[{i - 1}]; merge them")
            if i and r > self.rates[i - 1]:
                raise ReferenceError(
                    f"rates[{i}] = {r} at edge {e} exceeds rates[{i - 1}] = {self.rates[i - 1]}: "
                    "the fraction of events at or above an edge cannot grow with the edge"
                )
        return self

    def knots(self) -> tuple[np.ndarray, np.ndarray]:
        return _anchored([1.0 - r for r in self.rates], list(self.edges))

    def edge_rates(self) -> list[tuple[float, float]]:
        return list(zip(self.edges, self.rates))


class QuantileTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="quantiles"):
    probabilities: list[float]
    values: list[float]

    def validate(self) -> QuantileTable:
        if len(self.probabilities) < 2:
            raise ReferenceError("quantile table needs at least two entries")
        if len(self.probabilities) != len(self.values):
            raise ReferenceError(
                f"quantile table has {len(self.probabilities)} probabilities but {len(self.values)} values"
            )
        for i, (p, v) in enumerate(zip(self.probabilities, self.values)):
            if not (0.0 <= p <= 1.0):
                raise ReferenceError(f"probabilities[{i}] = {p} must be in [0, 1]")
            if not (0.0 <= v <= 1.0) or math.isnan(v):
                raise ReferenceError(f"values[{i}] = {v} must be a score in [0, 1]")
            if i and p <= self.probabilities[i - 1]:
                raise ReferenceError(
                    f"probabilities[{i}] = {p} must be greater than "
                    f"probabilities[{i - 1}] = {self.probabilities[i - 1]}"
                )
            if i and v < self.values[i - 1]:
                raise ReferenceError(
                    f"values[{i}] = {v} is below values[{i - 1}] = {self.values[i - 1]}: quantiles never decrease"
                )
        return self

    def knots(self) -> tuple[np.ndarray, np.ndarray]:
        return _anchored(list(self.probabilities), list(self.values))

    def edge_rates(self) -> list[tuple[float, float]]:
        """Interior (score, fraction at or above) pairs, for reports."""
        return [(v, 1.0 - p) for p, v in zip(self.probabilities, self.values) if 0.0 < p < 1.0]

    @classmethod
    def from_scores(cls, scores: np.ndarray, size: int = 201) -> QuantileTable:
        """A table from a score sample, e.g. an incumbent model's live scores."""
        s = np.asarray(scores, dtype=np.float64)
        if s.size == 0 or np.isnan(s).any():
            raise ReferenceError("a quantile table needs a non-empty sample without NaN")
        tail = 1.0 - np.geomspace(0.5, max(1.0 / s.size, 1e-4), size // 2)
        probs = np.unique(np.concatenate([np.linspace(0.0, 1.0, size - size // 2), tail]))
        vals = np.clip(np.quantile(s, probs), 0.0, 1.0)
        return cls(probs.tolist(), np.maximum.accumulate(vals).tolist()).validate()


Reference = AlertRateCurve | QuantileTable


class ReferenceFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A reference as stored on disk: a name, an intent-level description and the curve."""

    name: str
    reference: Reference
    description: str = ""


def inverse_cdf(reference: Reference, q: npt.ArrayLike) -> np.ndarray:
    """F_ref^-1(q); at a jump (repeated probability) the higher score wins."""
    p, v = reference.knots()
    q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
    hi = np.searchsorted(p, q, side="right")  # first knot strictly above q
    lo = np.clip(hi - 1, 0, len(p) - 1)
    hi = np.clip(hi, 0, len(p) - 1)
    span = p[hi] - p[lo]
    t = np.where(span > 0, (q - p[lo]) / np.where(span > 0, span, 1.0), 0.0)
    values: np.ndarray = v[lo] + t * (v[hi] - v[lo])
    return values


def load_reference(path: str) -> ReferenceFile:
    """Read a reference from TOML or JSON, validated; errors name the file and entry.

    Parsed within the document limits (muse.calib.names.parse_document): a file nested
    deeper than MAX_DEPTH is a ReferenceError naming the file and the limit."""
    import pathlib

    file = pathlib.Path(path)
    try:
        obj = parse_document(file.read_bytes(), str(file), toml=file.suffix == ".toml")
        ref = msgspec.convert(obj, ReferenceFile)
    except FileNotFoundError:
        raise ReferenceError(f"{file}: no such reference file") from None
    except LimitError as exc:  # names the file and the limit
        raise ReferenceError(str(exc)) from None
    except msgspec.ValidationError as exc:
        raise ReferenceError(f"{file}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ReferenceError(f"{file}: not valid {file.suffix.lstrip('.') or 'JSON'} ({exc})") from None
    try:
        ref.reference.validate()
    except ReferenceError as exc:
        raise ReferenceError(f"{file}: {exc}") from None
    return ref


def encode_reference(ref: ReferenceFile, toml: bool = True) -> bytes:
    return msgspec.toml.encode(ref) if toml else msgspec.json.encode(ref)
