"""The OpenAPI 3.1 document served at /openapi.json, with schemas generated
from the same msgspec Structs that decode the requests."""
from __future__ import annotations

import functools

import msgspec

from muse.core.spec import DeploymentSpec

from .schemas import (
    ErrorBody, InferRequest, InferResponse, ModelMetadata, PromoteRequest, RollbackRequest, ScoreRequest,
    ScoreResponse, ServerMetadata,
)

_REF = "#/components/schemas/{name}"


def _json(name: str) -> dict:
    return {"content": {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}}


def _optional_body(op: dict) -> dict:
    return {**op, "requestBody": {**op["requestBody"], "required": False}}


def _public(op: dict) -> dict:
    """Health, metadata and metrics answer without a key (probes and scrapers have none)."""
    return {**op, "security": []}


def _op(summary: str, ok: str | None, body: str | None = None, errors=(400, 401, 403, 404, 413, 422, 503)) -> dict:
    responses = {"200": {"description": "OK", **(_json(ok) if ok else {})}}
    for code in errors:
        responses[str(code)] = {"description": "error; `field` names the part of the request at fault",
                                **_json("ErrorBody")}
    op = {"summary": summary, "responses": responses}
    if body:
        op["requestBody"] = {"required": True, **_json(body)}
    return op


@functools.cache
def document(version: str) -> bytes:
    _, components = msgspec.json.schema_components(
        [ScoreRequest, ScoreResponse, ErrorBody, InferRequest, InferResponse, ModelMetadata, ServerMetadata,
         DeploymentSpec, PromoteRequest, RollbackRequest],
        ref_template=_REF,
    )
    intent = [{"name": "intent", "in": "path", "required": True, "schema": {"type": "string"}, "example": "fraud"}]
    spec_ref = {"$ref": _REF.format(name="DeploymentSpec")}
    deployment_body = {"required": True, "content": {"application/json": {"schema": spec_ref},
                                                     "application/toml": {"schema": spec_ref}}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "MUSE scoring server", "version": version},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            "/v1/score": {"post": _op("Score events for a tenant and intent", "ScoreResponse", "ScoreRequest")},
            "/v2": {"get": _public(_op("Server metadata (Open Inference Protocol)", "ServerMetadata", errors=()))},
            "/v2/health/live": {"get": _public(_op("Liveness", None, errors=()))},
            "/v2/health/ready": {"get": _public(_op("Readiness: every model and kernel loaded and warm", None,
                                                    errors=(503,)))},
            "/v2/models/{intent}": {"get": {**_op("Model metadata of the intent's active predictor", "ModelMetadata",
                                                  errors=(401, 404, 503)), "parameters": intent}},
            "/v2/models/{intent}/ready": {"get": {**_op("Intent readiness", None, errors=(401, 404, 503)),
                                                  "parameters": intent}},
            "/v2/models/{intent}/infer": {"post": {**_op("Inference (Open Inference Protocol); tenant from the key "
                                                         "or parameters.tenant", "InferResponse", "InferRequest"),
                                                   "parameters": intent}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [],
                                 "responses": {"200": {"description": "text exposition format"}}}},
            "/admin/deployment": {
                "get": _op("The deployment being served (admin key)", None, errors=(401, 403, 503)),
                "post": {**_op("Validate, publish and serve a deployment (admin key)", None,
                               errors=(400, 401, 403, 409, 413, 422)), "requestBody": deployment_body},
            },
            "/admin/deployment/validate": {"post": {**_op("Validate a deployment without publishing it (admin key)",
                                                          None, errors=(400, 401, 403, 413, 422)),
                                                    "requestBody": deployment_body}},
            "/admin/promote": {"post": _op("Publish a generation where the predictor is active (admin key)", None,
                                           "PromoteRequest", errors=(400, 401, 403, 409, 413, 422))},
            "/admin/rollback": {"post": _optional_body(_op("Publish an earlier generation again (admin key)", None,
                                                           "RollbackRequest", errors=(400, 401, 403, 409, 413, 422)))},
        },
    }
    return msgspec.json.encode(doc)
