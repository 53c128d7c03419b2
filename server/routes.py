"""The route table: one list of endpoints that drives both dispatch and the
OpenAPI document's paths (server/openapi.py).  Paths are templates
(``/v2/models/{intent}/infer``); their parameters reach the handler as
keyword arguments.  GET endpoints answer HEAD too."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import api_admin, api_health, api_inference, api_scoring
from .asgi import HTTPError, Response

Handler = Callable[..., Awaitable[Response]]
CLIENT_ERRORS = (400, 401, 403, 404, 413, 422, 503)
ADMIN_ERRORS = (400, 401, 403, 409, 413, 422)


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    request: str | None = None  # schema of the JSON body (a Struct's name in openapi.SCHEMAS)
    response: str | None = None  # schema of a 200's JSON body
    errors: tuple[int, ...] = CLIENT_ERRORS
    public: bool = False  # answers without a key (probes, scrapers)
    body: str = "json"  # "json", "optional" (may be empty) or "deployment" (JSON or TOML)
    params: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(re.findall(r"{(\w+)}", self.path)))


class RouteTable:
    def __init__(self, endpoints: list[Endpoint]):
        self.endpoints = endpoints
        self._exact = {(e.method, e.path): e for e in endpoints if not e.params}
        self._templates = [
            (re.compile("^" + re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", e.path) + "$"), e) for e in endpoints if e.params
        ]

    def match(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]]:
        """The endpoint for (method, path) and its path parameters; 404 or 405 if none."""
        wanted = "GET" if method == "HEAD" else method
        endpoint = self._exact.get((wanted, path))
        if endpoint is not None:  # the common case, one dict lookup
            return endpoint, {}
        allowed = [e.method for (m, p), e in self._exact.items() if p == path]
        for pattern, e in self._templates:
            found = pattern.match(path)
            if found is None:
                continue
            if e.method == wanted:
                return e, found.groupdict()
            allowed.append(e.method)
        if allowed:
            methods = sorted(set(allowed)) + (["HEAD"] if "GET" in allowed else [])
            raise HTTPError(
                405,
                f"method {method} not allowed on {path} (allowed: {', '.join(methods)})",
                None,
                [(b"allow", ", ".join(methods).encode())],
            )
        raise HTTPError(404, f"no endpoint {path}")


INTENT = "/v2/models/{intent}"
VERSION = "/v2/models/{intent}/versions/{version}"

ROUTES = RouteTable(
    [
        Endpoint(
            "POST",
            "/v1/score",
            api_scoring.score,
            "Score events for a tenant and intent",
            request="ScoreRequest",
            response="ScoreResponse",
        ),
        Endpoint(
            "GET",
            "/v2",
            api_health.server_metadata,
            "Server metadata (Open Inference Protocol)",
            response="ServerMetadata",
            errors=(),
            public=True,
        ),
        Endpoint("GET", "/v2/health/live", api_health.live, "Liveness", errors=(), public=True),
        Endpoint(
            "GET",
            "/v2/health/ready",
            api_health.ready,
            "Readiness: every model and kernel loaded and warm",
            errors=(503,),
            public=True,
        ),
        *(
            Endpoint(
                "GET",
                base,
                api_inference.metadata,
                "Model metadata of the intent's active predictor",
                response="ModelMetadata",
                errors=(401, 404, 503),
            )
            for base in (INTENT, VERSION)
        ),
        *(
            Endpoint("GET", base + "/ready", api_inference.ready, "Intent readiness", errors=(401, 404, 503))
            for base in (INTENT, VERSION)
        ),
        *(
            Endpoint(
                "POST",
                base + "/infer",
                api_inference.infer,
                "Inference (Open Inference Protocol); tenant from the key or parameters.tenant",
                request="InferRequest",
                response="InferResponse",
            )
            for base in (INTENT, VERSION)
        ),
        Endpoint("GET", "/metrics", api_health.metrics, "Prometheus metrics", errors=(), public=True),
        Endpoint("GET", "/openapi.json", api_health.openapi, "This document", errors=(), public=True),
        Endpoint(
            "GET",
            "/admin/deployment",
            api_admin.get_deployment,
            "The deployment being served (admin key)",
            errors=(401, 403, 503),
        ),
        Endpoint(
            "POST",
            "/admin/deployment",
            api_admin.apply_deployment,
            "Validate, publish and serve a deployment (admin key)",
            request="DeploymentSpec",
            errors=ADMIN_ERRORS,
            body="deployment",
        ),
        Endpoint(
            "POST",
            "/admin/deployment/validate",
            api_admin.validate_deployment,
            "Validate a deployment without publishing it (admin key)",
            request="DeploymentSpec",
            errors=(400, 401, 403, 413, 422),
            body="deployment",
        ),
        Endpoint(
            "POST",
            "/admin/promote",
            api_admin.promote,
            "Publish a generation where the predictor is active (admin key)",
            request="PromoteRequest",
            errors=ADMIN_ERRORS,
        ),
        Endpoint(
            "POST",
            "/admin/rollback",
            api_admin.rollback,
            "Publish an earlier generation again (admin key)",
            request="RollbackRequest",
            errors=ADMIN_ERRORS,
            body="optional",
        ),
    ]
)
