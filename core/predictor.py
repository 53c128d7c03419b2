"""Predictors: model(s) -> posterior correction -> quantile map, as one scoring call.

A predictor is stateless: it holds references to shared loaded models, the
snapshot's map table and, per tenant, which map of that table to use."""
from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass, field
from typing import Awaitable

import numpy as np

from muse.calib import MapTable, ModelIdentity
from muse.calib.posterior import correct_margins, correct_probabilities
from muse.compile import Calibrator

from .batching import ModelBatcher


def ensemble_identity(name: str, version: str, library_hashes: list[str]) -> ModelIdentity:
    """What an ensemble predictor's calibration must name: its members' exact libraries."""
    digest = hashlib.sha256("\n".join(library_hashes).encode()).hexdigest()
    return ModelIdentity(name, version, digest)


@dataclass(frozen=True)
class Predictor:
    name: str
    version: str
    intent: str
    batchers: tuple[ModelBatcher, ...]
    combine: str
    feature_names: tuple[str, ...]
    table: MapTable
    maps: dict  # tenant (or None for all traffic) -> map index in table
    calibration: str | None
    feature_index: dict = field(init=False, repr=False, compare=False)  # name -> column
    calibrator: Calibrator | None = field(default=None, repr=False, compare=False)  # table's native handle

    def __post_init__(self):
        object.__setattr__(self, "feature_index", {n: i for i, n in enumerate(self.feature_names)})

    @property
    def num_feature(self) -> int:
        return len(self.feature_names)

    def map_index(self, tenant: str) -> int:
        return self.maps.get(tenant, self.maps[None])

    def score_now(self, X: np.ndarray, map_index: np.ndarray) -> np.ndarray:
        """[3, n] on the calling thread, bypassing the batchers (shadow work: never queue beside live rows)."""
        if len(self.batchers) == 1:
            return self.batchers[0].model.score(X, self.calibrator, map_index)
        return self._stack(*self._combine([b.model.predict(X, margin=True) for b in self.batchers]), map_index)

    def _combine(self, member_margins: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """An ensemble's (combined margin, corrected score) from its members' raw outputs."""
        manifests = [b.model.manifest for b in self.batchers]
        if self.combine == "mean_logit":
            # Correct each member's logit by its own beta, then average the logits.
            margins = np.mean([r + math.log(m.beta) for r, m in zip(member_margins, manifests)], axis=0)
            return margins, correct_margins(margins, 1.0)
        probs = [correct_margins(r, m.beta) if m.margin_kind == "logit" else correct_probabilities(r, m.beta)
                 for r, m in zip(member_margins, manifests)]
        margins = np.mean(probs, axis=0)
        return margins, margins

    def _stack(self, margins: np.ndarray, corrected: np.ndarray, map_index) -> np.ndarray:
        return np.stack([margins, corrected, self.table.apply(corrected, map_index)])

    def score(self, X: np.ndarray, map_index: int) -> Awaitable[np.ndarray]:
        """[3, n]: margins, corrected and mapped scores (map ``map_index`` of the table).  A plain
        function returning the batcher's coroutine, not a coroutine of its own: one frame less
        per request."""
        if len(self.batchers) == 1:  # calibrated in the model's native call
            return self.batchers[0].submit(X, self.calibrator, map_index)
        return self._score_members(X, map_index)

    async def _score_members(self, X: np.ndarray, map_index: int) -> np.ndarray:
        margins = await asyncio.gather(*(b.submit(X) for b in self.batchers))
        return self._stack(*self._combine(margins), map_index)
