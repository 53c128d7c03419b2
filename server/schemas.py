"""Wire schemas as msgspec Structs: one decoder per type, errors that name the path.

Every request type is typed down to its leaves (no ``Any``), so a request nests no deeper
than its schema: msgspec refuses anything deeper at the first level too many, without
recursing into it.  Numbers are numbers: no strings, no booleans (``float`` takes ints)."""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from muse.calib.names import MAX_ELEMENTS, MAX_EVENT_ID_CHARS, MAX_TENANT_BYTES, TENANT_RULE, Name, route_tenant_problem

Feature = float | None  # null = missing
# A tenant name (muse.calib.names.check_tenant; Context.check_tenant applies all of the rule).
Tenant = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TENANT_BYTES, description=TENANT_RULE)]
Many = msgspec.Meta(max_length=MAX_ELEMENTS)  # the element-count limit of muse.calib.names
# A request id the client chooses (X-Request-ID, server/asgi.py; an Open Inference Protocol request's
# `id`): printable ASCII without spaces, as it goes into log lines and prefixes event ids.
MAX_REQUEST_ID = 128
REQUEST_ID = re.compile("[!-~]+")


def usable_request_id(value: str) -> bool:
    """Whether a client's id can prefix event ids and go into log lines as it is."""
    return len(value) <= MAX_REQUEST_ID and REQUEST_ID.fullmatch(value) is not None


class Event(msgspec.Struct, forbid_unknown_fields=True):
    features: list[Feature] | dict[str, Feature]
    # absent: the server makes one (server/api_scoring.py); bounded so that any id can be labelled
    id: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_EVENT_ID_CHARS)]
        | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
        | None
    ) = None


class ScoreRequest(msgspec.Struct, forbid_unknown_fields=True):
    tenant: Tenant
    intent: str
    events: Annotated[list[Event], msgspec.Meta(min_length=1, max_length=MAX_ELEMENTS)]


class RawEvent(Event):
    """An event whose features are kept as JSON text, for parsing off the event loop."""

    features: msgspec.Raw  # type: ignore[assignment]


class RawScoreRequest(ScoreRequest):
    events: Annotated[list[RawEvent], msgspec.Meta(min_length=1, max_length=MAX_ELEMENTS)]  # type: ignore[assignment]


class ScoreResponse(msgspec.Struct, omit_defaults=True):
    predictor: str
    version: str
    generation: int
    scores: list[float]
    # every event's id: the client's, or the one generated for it (server/api_scoring.py)
    ids: list[str | int]


class PromoteRequest(msgspec.Struct, forbid_unknown_fields=True):
    predictor: Name
    tenants: list[str] | None = None  # tenant names or "*"; default: every route of the predictor's intent

    def __post_init__(self) -> None:
        for i, tenant in enumerate(self.tenants or ()):
            problem = route_tenant_problem(tenant)
            if problem is not None:  # decoding reports it at `$`
                raise ValueError(f"tenants[{i}] {tenant!r} is not a tenant name ({problem}) nor '*'")


class RollbackRequest(msgspec.Struct, forbid_unknown_fields=True):
    to: int | None = None  # default: the generation before the current one


class ErrorBody(msgspec.Struct, omit_defaults=True):
    error: str
    field: str | None = None


# --- Open Inference Protocol (KServe v2) ------------------------------------------

# Parameter values are scalars (the protocol's $parameter), or one level of them.
Scalar = str | int | float | bool | None
Parameters = Annotated[dict[str, Scalar | list[Scalar] | dict[str, Scalar]], Many]
# A tensor's numbers, flat or as rows (shape [N, F]); null (or NaN, see api_inference) = missing.
TensorData = Annotated[list[Feature | Annotated[list[Feature], Many]], Many]


class InferInput(msgspec.Struct):
    name: str
    shape: Annotated[list[int], msgspec.Meta(max_length=8)]
    datatype: str
    data: TensorData | None = None  # absent with the binary tensor extension
    parameters: Parameters = {}


class RequestedOutput(msgspec.Struct):
    name: str
    parameters: Parameters = {}


class InferRequest(msgspec.Struct):
    inputs: Annotated[list[InferInput], msgspec.Meta(min_length=1, max_length=64)]
    # The protocol allows any string; one that cannot prefix event ids (usable_request_id) is echoed
    # all the same, and the rows are named after the server's request id (api_inference).
    id: Annotated[str, msgspec.Meta(max_length=MAX_EVENT_ID_CHARS)] | None = None
    parameters: Parameters = {}
    outputs: Annotated[list[RequestedOutput], msgspec.Meta(max_length=64)] = []


class InferOutput(msgspec.Struct, omit_defaults=True):
    name: str
    shape: list[int]
    datatype: str
    data: list[float] | None = None  # absent when sent as binary (parameters.binary_data_size)
    parameters: dict[str, Any] = {}


class InferResponse(msgspec.Struct, omit_defaults=True):
    model_name: str
    outputs: list[InferOutput]
    model_version: str | None = None
    id: str | None = None  # the request's id, or the one generated for it (server/api_inference.py)
    parameters: dict[str, Any] = {}


class TensorMeta(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(msgspec.Struct):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    parameters: dict[str, Any] = {}


class ServerMetadata(msgspec.Struct):
    name: str
    version: str
    extensions: list[str]
