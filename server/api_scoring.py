"""`POST /v1/score`: the native scoring API.  Events carry features in the
model's order or by name (null = missing); the answer names the predictor,
version and generation that produced the scores."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import numpy as np

from muse.calib.names import too_deep

from ._rows import rows_matrix
from .asgi import Request, Response, encode
from .context import Context
from .errors import HTTPError, validation_error
from .schemas import Event, ScoreRequest, ScoreResponse

DECODER = msgspec.json.Decoder(ScoreRequest)


async def score(app: Context, req: Request) -> Response:
    started = time.perf_counter()
    tenant = intent = predictor_name = ""
    try:
        principal = app.authenticate_scorer(req)
        if principal.tenant is not None:  # the key names the tenant: refuse before reading the body
            tenant = principal.tenant
            app.check_quota(tenant, "$.tenant")
        try:
            received = await req.body()
            app.check_json_size(len(received), "$")
            r = DECODER.decode(received)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise validation_error(exc) from None
        except RecursionError:  # defence in depth: the schema nests 4 deep and refuses more
            raise HTTPError(400, str(too_deep("request body")), "$") from None
        intent = r.intent
        app.check_tenant(principal, r.tenant, "$.tenant")
        tenant = r.tenant  # a metrics label from here on: a valid tenant name, the key's own
        lane = req.lane = app.lane(tenant, intent, None, "$.intent")
        predictor = lane.predictor
        predictor_name = predictor.name
        X = events_matrix(r.events, predictor.feature_index, predictor.feature_names)
        scores = await app.score_within_quota(lane, X, "$.tenant")
        body = encode(
            ScoreResponse(predictor.name, predictor.version, lane.generation, scores.mapped.tolist(), _ids(r.events))
        )
    except HTTPError as exc:
        app.count_error(exc, tenant, intent, predictor_name)
        raise
    lane.metrics.observe(len(X), time.perf_counter() - started, len(received))
    return 200, body, b"application/json", None


def _ids(events: list[Event]) -> list[Any] | None:
    """The events' ids in order, or None when no event has one (the usual case: nothing to echo)."""
    for event in events:
        if event.id is not None:
            return [e.id for e in events]
    return None


def events_matrix(events: list[Event], index: dict[str, int], names: tuple[str, ...]) -> np.ndarray:
    """Rows in the model's feature order; positional lists or {name: value}; null = missing."""
    width = len(names)
    rows: list[Any] = []
    for i, event in enumerate(events):
        features = event.features
        if type(features) is list:
            if len(features) != width:
                raise HTTPError(
                    422, f"expected {width} features in model order, got {len(features)}", f"$.events[{i}].features"
                )
            rows.append(features)
            continue
        assert isinstance(features, dict)
        row: list[Any] = [None] * width
        for name, value in features.items():
            j = index.get(name)
            if j is None:
                raise HTTPError(
                    422,
                    f"unknown feature {name!r}; the model's features are {', '.join(names)}",
                    f"$.events[{i}].features.{name}",
                )
            row[j] = value
        if len(features) != width:
            missing = [n for n in names if n not in features]
            raise HTTPError(
                422,
                f"missing features {', '.join(missing)}; send null for a missing value",
                f"$.events[{i}].features.{missing[0]}",
            )
        rows.append(row)
    result: np.ndarray = rows_matrix(rows, width)
    return result
