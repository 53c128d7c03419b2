"""Health, readiness, server metadata, Prometheus metrics and the OpenAPI
document: what probes, scrapers and tools read, without a key."""

from __future__ import annotations

from .asgi import Request, Response, json_response
from .context import Context
from .drift import monitor_edges
from .errors import RETRY_AFTER, HTTPError
from .metrics import CONTENT_TYPE
from .openapi import document
from .schemas import ServerMetadata

SERVER_VERSION = "0.1.0"
AUTH_OFF = "authentication is off (--no-auth): anyone who reaches this port may score for any tenant"


async def server_metadata(app: Context, req: Request) -> Response:
    return json_response(ServerMetadata("muse", SERVER_VERSION, ["binary_tensor_data"]))


async def live(app: Context, req: Request) -> Response:
    return json_response({"live": True})


async def ready(app: Context, req: Request) -> Response:
    snap = app.serving.snapshot
    if snap is None:
        raise HTTPError(503, "not ready: no deployment loaded yet", None, RETRY_AFTER)
    body: dict[str, object] = {"ready": True, "generation": snap.generation}
    if not app.settings.auth:
        body["warnings"] = [AUTH_OFF]
    return json_response(body)


async def metrics(app: Context, req: Request) -> Response:
    app.metrics_reader(req)
    app.serving.record_served()  # the drift windows, up to this request
    snap = app.serving.snapshot
    if snap is not None:
        app.metrics.drift.update({intent: monitor_edges(ref) for intent, ref in snap.references.items()})
    return 200, app.metrics.render(), CONTENT_TYPE.encode(), None


async def openapi(app: Context, req: Request) -> Response:
    return 200, document(app.routes, SERVER_VERSION), b"application/json", None
