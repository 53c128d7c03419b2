"""Wire schemas as msgspec Structs: one decoder per type, errors that name the path."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

Feature = float | None  # null = missing


class Event(msgspec.Struct, forbid_unknown_fields=True):
    features: list[Feature] | dict[str, Feature]
    id: str | int | None = None


class ScoreRequest(msgspec.Struct, forbid_unknown_fields=True):
    tenant: str
    intent: str
    events: Annotated[list[Event], msgspec.Meta(min_length=1)]


class ScoreResponse(msgspec.Struct, omit_defaults=True):
    predictor: str
    version: str
    generation: int
    scores: list[float]
    ids: list[str | int | None] | None = None


class PromoteRequest(msgspec.Struct, forbid_unknown_fields=True):
    predictor: str
    tenants: list[str] | None = None  # default: every route of the predictor's intent


class RollbackRequest(msgspec.Struct, forbid_unknown_fields=True):
    to: int | None = None  # default: the generation before the current one


class ErrorBody(msgspec.Struct, omit_defaults=True):
    error: str
    field: str | None = None


# --- Open Inference Protocol (KServe v2) ------------------------------------------


class InferInput(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: Any = None  # flat or nested numbers; absent with the binary tensor extension
    parameters: dict[str, Any] = {}


class RequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = {}


class InferRequest(msgspec.Struct):
    inputs: Annotated[list[InferInput], msgspec.Meta(min_length=1)]
    id: str | None = None
    parameters: dict[str, Any] = {}
    outputs: list[RequestedOutput] = []


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
    id: str | None = None
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
