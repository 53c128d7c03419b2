"""Predictors: model(s) -> posterior correction -> quantile map, as one scoring call.

A predictor is stateless: it holds references to shared loaded models, the
snapshot's map table and, per tenant, which map of that table to use."""
from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from muse.calib import MapTable, ModelIdentity
from muse.calib.posterior import correct_margins, correct_probabilities

from .batching import BatchResult, ModelBatcher


@dataclass(frozen=True)
class Scores:
    margins: np.ndarray  # the (combined) raw model output
    corrected: np.ndarray
    mapped: np.ndarray
    batch_rows: int
    queue_wait: float


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

    @property
    def num_feature(self) -> int:
        return len(self.feature_names)

    @property
    def models(self):
        return [b.model for b in self.batchers]

    def map_index(self, tenant: str) -> int:
        return self.maps.get(tenant, self.maps[None])

    async def score(self, X: np.ndarray, tenant: str) -> Scores:
        idx = self.map_index(tenant)
        if len(self.batchers) == 1:
            r = await self.batchers[0].submit(X, self.table, idx)
            if r.mapped is None:  # the batch mixed map tables (a deployment swap): calibrate here
                m = self.batchers[0].model.manifest
                r.corrected, r.mapped = self.table.calibrate(r.margins, np.full(len(X), idx), m.beta, m.margin_kind)
            return Scores(r.margins, r.corrected, r.mapped, r.batch_rows, r.queue_wait)
        results: list[BatchResult] = await asyncio.gather(*(b.submit(X) for b in self.batchers))
        if self.combine == "mean_logit":
            # Correct each member's logit by its own beta, then average the logits.
            logits = [r.margins + math.log(b.model.manifest.beta) for r, b in zip(results, self.batchers)]
            margins = np.mean(logits, axis=0)
            corrected = correct_margins(margins, 1.0)
        else:
            probs = []
            for r, b in zip(results, self.batchers):
                m = b.model.manifest
                probs.append(correct_margins(r.margins, m.beta) if m.margin_kind == "logit"
                             else correct_probabilities(r.margins, m.beta))
            margins = corrected = np.mean(probs, axis=0)
        mapped = self.table.apply(corrected, np.full(len(X), idx))
        return Scores(margins, corrected, mapped, max(r.batch_rows for r in results),
                      max(r.queue_wait for r in results))
