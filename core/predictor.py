"""Predictors: model(s) -> posterior correction -> quantile map, as one scoring call.

A predictor is stateless: it holds references to shared loaded models, the
snapshot's map table and, per tenant, which map of that table to use."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable
from dataclasses import dataclass, field

import numpy as np

from muse.calib import MapTable, ModelIdentity
from muse.calib.posterior import correct_margins
from muse.compile import NativeMapTable, Scores
from muse.compile.manifest import Manifest

from .batching import ModelBatcher

IDENTITY = 0  # map 0 of every snapshot's table: scores pass unmapped (ensemble members)


def ensemble_identity(name: str, version: str, members: list[Manifest], combine: str) -> ModelIdentity:
    """What an ensemble predictor's calibration must name: whatever shapes its combined scores --
    each member's exact library and its beta (the same library compiled with another --beta
    has the same checksum), and how they combine."""
    lines = [f"{m.name}/{m.version} {m.library_sha256} {m.beta!r} {m.margin_kind}" for m in members]
    digest = hashlib.sha256("\n".join([*lines, combine]).encode()).hexdigest()
    return ModelIdentity(name, version, digest)


@dataclass(frozen=True)
class Predictor:
    name: str
    version: str
    intent: str
    batchers: tuple[ModelBatcher, ...]
    combine: str
    feature_names: tuple[str, ...]
    table: MapTable  # the snapshot's maps, every predictor's
    native_table: NativeMapTable = field(repr=False, compare=False)  # the table's native handle
    maps: dict[str | None, int]  # tenant (or None for all traffic) -> map index in table
    calibration: str | None
    feature_index: dict[str, int] = field(init=False, repr=False, compare=False)  # name -> column

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_index", {n: i for i, n in enumerate(self.feature_names)})

    @property
    def num_feature(self) -> int:
        return len(self.feature_names)

    def map_index(self, tenant: str) -> int:
        return self.maps.get(tenant, self.maps[None])

    def score(self, X: np.ndarray, map_index: int | np.ndarray) -> Scores:
        """Scores of X on the calling thread, bypassing the batchers (shadow work: never queue
        beside live rows); ``map_index`` is one map for all rows or one per row."""
        native = self.native_table
        if len(self.batchers) == 1:
            return self.batchers[0].model.score(X, native, map_index)
        return self._combine([b.model.score(X, native, IDENTITY) for b in self.batchers], map_index)

    def score_async(self, X: np.ndarray, map_index: int, tenant: str, weight: int = 1) -> Awaitable[Scores]:
        """Scores of X through the batchers, mapped through map ``map_index`` of the table, queued
        as ``tenant``'s rows with its ``weight`` (its share of each model when tenants wait; see
        muse.core.batching).  A plain function returning the batcher's coroutine, not a coroutine
        of its own: one frame less per request."""
        if len(self.batchers) == 1:  # calibrated in the model's native call
            return self.batchers[0].score_async(X, self.native_table, map_index, tenant, weight)
        return self._score_members(X, map_index, tenant, weight)

    async def _score_members(self, X: np.ndarray, map_index: int, tenant: str, weight: int) -> Scores:
        native = self.native_table
        calls = [asyncio.ensure_future(b.score_async(X, native, IDENTITY, tenant, weight)) for b in self.batchers]
        try:
            members = await asyncio.gather(*calls)
        except BaseException:
            # one member failed (Overloaded) or the caller went away: the others' rows would be
            # scored for no one, after the request's quota was given back
            for call in calls:
                call.cancel()
            raise
        return self._combine(list(members), map_index)

    def _combine(self, members: list[Scores], map_index: int | np.ndarray) -> Scores:
        """An ensemble's scores from its members' (each corrected by its own beta, unmapped)."""
        if self.combine == "mean_logit":
            # Each member's logit shifted by its own ln beta, then averaged.
            margins = np.mean(
                [s.margin + math.log(b.model.manifest.beta) for s, b in zip(members, self.batchers)], axis=0
            )
            corrected = correct_margins(margins, 1.0)
        else:
            margins = corrected = np.mean([s.corrected for s in members], axis=0)
        return Scores.stack(margins, corrected, self.table.apply(corrected, map_index))
