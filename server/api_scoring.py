"""`POST /v1/score`: the native scoring API.  Events carry features in the
model's order or by name (null = missing); the answer names the predictor,
version and generation that produced the scores, and every event's id.

An event's id is the client's ``id`` where it sent one (echoed as sent: a string
or an integer), else ``<request id>-<i>``: the request's id (server/asgi.py
``Request.id``: the client's X-Request-ID, else a random one) and the event's
index in the request, so generated ids are unique as long as request ids are.
The score log keeps the same ids (an integer id as its decimal string).  When
none of several events has an id, the answer's ``ids`` are written as JSON
directly, from a table of index strings: formatting a Python string per event
took ~10x as long (100 events: 12.6 us against 1.2 us, measured).

A large body (LARGE_JSON_BYTES and over) is decoded with its events' features left as JSON
text, and the features are parsed into the matrix on a thread with the GIL released
(server/_rows.pyx ``raw_rows_matrix``), so that other tenants' requests are served meanwhile.
A 1,000-event request of 100 features (0.7 MB) held the event loop 4.9 ms decoded whole; this
way the loop spends 1.5 ms on it and the thread 1.5 ms (medians of 15, in one process).
Features by name, and anything the full decode would refuse, go the full way, which
names the field at fault."""

from __future__ import annotations

import time
from typing import Any, cast

import msgspec
import numpy as np

from muse.calib.names import too_deep

from ._rows import raw_rows_matrix, rows_matrix
from .asgi import Request, Response, encode
from .context import Context
from .errors import HTTPError, validation_error
from .schemas import Event, RawScoreRequest, ScoreRequest, ScoreResponse

DECODER = msgspec.json.Decoder(ScoreRequest)
RAW_DECODER = msgspec.json.Decoder(RawScoreRequest)
LARGE_JSON_BYTES = 1 << 16  # ~90 events of 100 features: from here on, features are parsed off the loop


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
            r = decode_request(received)
            X = None
            if isinstance(r, RawScoreRequest):  # a large body: its features parsed off the loop
                X = await app.off_loop(raw_rows_matrix, [e.features for e in r.events])
                if X is None:  # features by name, or a field the whole decode refuses and names
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
        if X is None or X.shape[1] != len(predictor.feature_names):
            if isinstance(r, RawScoreRequest):  # rows of another width: the whole decode's error names them
                r = decode_whole(received)
            X = events_matrix(r.events, predictor.feature_index, predictor.feature_names)
        request_id = req.id
        answered, logged = event_ids(request_id, r.events)
        scores = await app.score_within_quota(lane, X, "$.tenant")
        lane.record(X, scores, (request_id, None, logged))  # generated ids: <request id>-<i>
        body = encode(
            ScoreResponse(predictor.name, predictor.version, lane.generation, scores.mapped.tolist(), answered)
        )
    except HTTPError as exc:
        app.count_error(exc, tenant, intent, predictor_name)
        raise
    lane.metrics.observe(len(X), time.perf_counter() - started, len(received))
    return 200, body, b"application/json", None


def decode_request(body: bytes) -> ScoreRequest:
    """A large body with its features left as JSON text (RawScoreRequest) where it decodes so;
    else the whole decode, whose errors name the field at fault."""
    if len(body) >= LARGE_JSON_BYTES:
        try:
            return RAW_DECODER.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            pass
    return DECODER.decode(body)


def decode_whole(received: bytes) -> ScoreRequest:
    try:
        return DECODER.decode(received)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise validation_error(exc) from None


def event_ids(request_id: str, events: list[Event]) -> tuple[list[str | int], list[str | int | None] | None]:
    """(the events' ids as answered, the client's ids as logged: None when it sent none)."""
    given = [e.id for e in events]
    missing = given.count(None)
    if missing == len(given):
        if missing == 1:  # the usual batch-1 request: one string costs less than the join below
            return [request_id + "-0"], None
        return cast("list[str | int]", generated_ids(request_id, len(given))), None
    for i, g in enumerate(given):
        # what `muse labels import` refuses (control, format and separator characters) must not be served
        if type(g) is str and not g.isprintable():
            raise HTTPError(422, f"event id {g!r} holds an unprintable character", f"$.events[{i}].id")
    if missing == 0:
        return cast("list[str | int]", given), given
    return [f"{request_id}-{i}" if g is None else g for i, g in enumerate(given)], given


_INDEXES: list[bytes] = []  # b"0", b"1", ...: made once, up to _MAX_INDEXES (~5 MB of them)
_MAX_INDEXES = 100_000


def generated_ids(prefix: str, n: int) -> msgspec.Raw:
    """``["<prefix>-0", ..., "<prefix>-<n-1>"]`` as JSON."""
    if n > len(_INDEXES) and len(_INDEXES) < _MAX_INDEXES:
        _INDEXES.extend(b"%d" % i for i in range(len(_INDEXES), min(n, _MAX_INDEXES)))
    indexes = _INDEXES[:n] if n <= len(_INDEXES) else _INDEXES + [b"%d" % i for i in range(len(_INDEXES), n)]
    head = encode(prefix)[:-1] + b"-"  # the opening quote, the prefix JSON-escaped, the dash
    return msgspec.Raw(b"[" + head + (b'",' + head).join(indexes) + b'"]')


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
