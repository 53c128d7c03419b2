"""The OpenAPI 3.1 document served at /openapi.json, with schemas generated
from the same msgspec Structs that decode the requests."""
from __future__ import annotations

import functools

import msgspec

from .schemas import ErrorBody, InferRequest, InferResponse, ModelMetadata, ScoreRequest, ScoreResponse, ServerMetadata

_REF = "#/components/schemas/{name}"


def _json(name: str) -> dict:
    return {"content": {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}}


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
        [ScoreRequest, ScoreResponse, ErrorBody, InferRequest, InferResponse, ModelMetadata, ServerMetadata],
        ref_template=_REF,
    )
    intent = [{"name": "intent", "in": "path", "required": True, "schema": {"type": "string"}}]
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
            "/v2": {"get": _op("Server metadata (Open Inference Protocol)", "ServerMetadata", errors=())},
            "/v2/health/live": {"get": _op("Liveness", None, errors=())},
            "/v2/health/ready": {"get": _op("Readiness: every model and kernel loaded and warm", None, errors=(503,))},
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
                "post": _op("Validate, publish and serve a deployment, TOML or JSON (admin key)", None,
                            errors=(401, 403, 409, 413, 422)),
            },
            "/admin/deployment/validate": {"post": _op("Validate a deployment without publishing it (admin key)",
                                                       None, errors=(401, 403, 413, 422))},
        },
    }
    return msgspec.json.encode(doc)
