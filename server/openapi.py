"""The OpenAPI 3.1 document served at /openapi.json: its paths from the route
table (server/routes.py), its schemas generated from the same msgspec Structs
that decode the requests."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import msgspec

from muse.core.spec import DeploymentSpec

from .schemas import (
    ErrorBody,
    InferRequest,
    InferResponse,
    ModelMetadata,
    PromoteRequest,
    RollbackRequest,
    ScoreRequest,
    ScoreResponse,
    ServerMetadata,
)

if TYPE_CHECKING:
    from .routes import Endpoint, RouteTable

SCHEMAS = [
    ScoreRequest,
    ScoreResponse,
    ErrorBody,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ServerMetadata,
    DeploymentSpec,
    PromoteRequest,
    RollbackRequest,
]
_REF = "#/components/schemas/{name}"
_EXAMPLES = {"intent": "fraud", "version": "1"}


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}}


def operation(e: Endpoint) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "OK", **(_json(e.response) if e.response else {})}}
    if e.path == "/metrics":
        responses["200"]["description"] = "text exposition format"
    for code in e.errors:
        responses[str(code)] = {
            "description": "error; `field` names the part of the request at fault",
            **_json("ErrorBody"),
        }
    op: dict[str, Any] = {"summary": e.summary, "responses": responses}
    if e.public:
        op["security"] = []
    if e.params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}, "example": _EXAMPLES.get(p, p)}
            for p in e.params
        ]
    if e.request:
        ref = {"$ref": _REF.format(name=e.request)}
        content = {"application/json": {"schema": ref}}
        if e.body == "deployment":
            content["application/toml"] = {"schema": ref}
        op["requestBody"] = {"required": e.body != "optional", "content": content}
    return op


@functools.cache
def document(routes: RouteTable, version: str) -> bytes:
    _, components = msgspec.json.schema_components(SCHEMAS, ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for e in routes.endpoints:
        paths.setdefault(e.path, {})[e.method.lower()] = operation(e)
    return msgspec.json.encode(
        {
            "openapi": "3.1.0",
            "info": {"title": "MUSE scoring server", "version": version},
            "components": {
                "schemas": components,
                "securitySchemes": {
                    "bearer": {"type": "http", "scheme": "bearer"},
                    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                },
            },
            "security": [{"bearer": []}, {"apiKey": []}],
            "paths": paths,
        }
    )
