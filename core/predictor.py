"""Predictors: model(s) -> posterior correction -> quantile map, as one scoring call.

A predictor is stateless: it holds references to shared loaded models, the
snapshot's map table and, per tenant, which map of that table to use."""
from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from muse.calib import MapTable, ModelIdentity
from muse.calib.posterior import correct_margins, correct_probabilities
from muse.compile import Calibrator

from .batching import ModelBatcher, Scores


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

    def score_now(self, X: np.ndarray, map_index: np.ndarray) -> Scores:
        """Score on the calling thread, bypassing the batchers (shadow work: never queue beside live rows)."""
        if len(self.batchers) == 1:
            out = self.batchers[0].model.score(X, self.calibrator, map_index)
            return Scores(out[0], out[1], out[2], len(X), 0.0)
        margins, corrected = self._combine([b.model.predict(X, margin=True) for b in self.batchers])
        return Scores(margins, corrected, self.table.apply(corrected, map_index), len(X), 0.0)

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

    async def score(self, X: np.ndarray, tenant: str) -> Scores:
        idx = self.map_index(tenant)
        if len(self.batchers) == 1:
            return await self.batchers[0].submit(X, self.calibrator, idx)
        results: list[Scores] = await asyncio.gather(*(b.submit(X) for b in self.batchers))
        margins, corrected = self._combine([r.margins for r in results])
        mapped = self.table.apply(corrected, idx)
        return Scores(margins, corrected, mapped, max(r.batch_rows for r in results),
                      max(r.queue_wait for r in results))
