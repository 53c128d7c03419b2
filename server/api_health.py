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


async def server_metadata(app: Context, req: Request) -> Response:
    return json_response(ServerMetadata("muse", SERVER_VERSION, ["binary_tensor_data"]))


async def live(app: Context, req: Request) -> Response:
    return json_response({"live": True})


async def ready(app: Context, req: Request) -> Response:
    snap = app.serving.snapshot
    if snap is None:
        raise HTTPError(503, "not ready: no deployment loaded yet", None, RETRY_AFTER)
    return json_response({"ready": True, "generation": snap.generation})


async def metrics(app: Context, req: Request) -> Response:
    app.serving.record_served()  # the drift windows, up to this request
    snap = app.serving.snapshot
    if snap is not None:
        app.metrics.drift.update({intent: monitor_edges(ref) for intent, ref in snap.references.items()})
    return 200, app.metrics.render(), CONTENT_TYPE.encode(), None


async def openapi(app: Context, req: Request) -> Response:
    return 200, document(app.routes, SERVER_VERSION), b"application/json", None
