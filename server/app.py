"""The ASGI app: dispatch through its route table, the lifespan, and the
factory Granian's workers call.  The endpoints live in the modules named for
what they serve (api_scoring, api_inference, api_admin, api_health) and reach
the server through server/context.py.

Anything an endpoint raises other than an HTTPError is a 500 that is logged
and counted, and it fails only its own request."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from typing import Any

from . import api_admin, api_health, api_inference, api_scoring
from .asgi import BodyDeadlines, Receive, Request, Send, send
from .context import Context, log
from .errors import HTTPError
from .routes import ADMIN_ERRORS, Endpoint, RouteTable
from .settings import SUPERVISOR_ENV, Settings, from_environment

access_log = logging.getLogger("muse.access")
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
        Endpoint(
            "GET",
            "/metrics",
            api_health.metrics,
            "Prometheus metrics (with --metrics-auth: an admin or metrics key)",
            errors=(401, 403),
            public=True,
        ),
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


class MuseApp(Context):
    def __init__(self, settings: Settings, routes: RouteTable = ROUTES):
        super().__init__(settings, routes)
        self.body_deadlines = BodyDeadlines(settings.body_timeout)

    # -- ASGI ----------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Receive, send_fn: Send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send_fn)
        if scope["type"] != "http":
            return None
        req = Request(scope, receive, self.settings.max_body_bytes, self.body_deadlines)
        started = time.perf_counter() if self.settings.access_log else 0.0
        try:
            endpoint, params = self.routes.match(req.method, req.path)
            # (no ** for the common parameterless call: it builds a dict each time)
            coro = endpoint.handler(self, req, **params) if params else endpoint.handler(self, req)
            status, body, content_type, headers = await coro
        except HTTPError as exc:
            status, body, content_type, headers = exc.status, exc.body(), b"application/json", exc.headers
        except ConnectionAbortedError:
            return None
        except Exception:
            log.exception("%s %r", req.method, req.path, extra=request_fields(req, 500))
            self.metrics.errors.labels("", "", "", "internal").inc()
            status = 500
            body = HTTPError(500, f"internal error; see the server log, request id {req.id}").body()
            content_type, headers = b"application/json", [(b"x-request-id", req.id.encode())]
        await send(send_fn, status, body, content_type, headers)
        if self.settings.access_log:
            fields = request_fields(req, status)
            fields["ms"] = round((time.perf_counter() - started) * 1e3, 3)
            # the path as a repr: it is the client's, percent-decoded (a newline could forge a line)
            access_log.info(
                "%s %r %d %.3f ms id=%s key=%s tenant=%s",
                req.method,
                req.path,
                status,
                fields["ms"],
                req.id,
                req.key_id or "-",
                fields.get("tenant", "-"),
                extra=fields,
            )
        return None

    async def _lifespan(self, receive: Receive, send_fn: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.body_deadlines.start()
                    await self.serving.start()
                except Exception as exc:
                    log.exception("start-up")
                    await send_fn({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send_fn({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.body_deadlines.stop()
                await self.serving.stop()
                await send_fn({"type": "lifespan.shutdown.complete"})
                return


def request_fields(req: Request, status: int) -> dict[str, Any]:
    """What a log line says about a request: its id, the key that sent it and the lane that
    served it."""
    fields: dict[str, Any] = {
        "event": "request",
        "request_id": req.id,
        "method": req.method,
        "path": req.path,
        "status": status,
        "client": (req.scope.get("client") or ("", 0))[0],
        "key_id": req.key_id,
    }
    lane = req.lane
    if lane is not None:
        fields.update(
            tenant=lane.tenant,
            intent=lane.predictor.intent,
            predictor=lane.predictor.name,
            version=lane.predictor.version,
            generation=lane.generation,
        )
    return fields


PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def _stop_with_the_supervisor() -> None:
    """Have Linux kill this worker when the `muse serve` process that started it dies (SIGKILL,
    a crash): an orphaned worker would go on answering on the port, unsupervised and no longer
    following deployments if the registry is on object storage.  Granian starts workers from its
    main thread, whose exit is what the kernel watches.

    SIGKILL, not SIGTERM: a Granian worker that gets SIGTERM with no supervisor can hang in its
    signal handler for ever, holding the GIL (seen in about 1 of 3 SIGKILLs of `muse serve`; its
    supervisor, when alive, kills such a worker after a timeout).  What the worker's score log
    held and had not flushed (at most --score-log-flush-seconds of rows) is lost with it."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # best effort: the supervisor's own exit path stops workers as before
    # it may have died before the request took effect (even before this worker's imports)
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor is not None and str(os.getppid()) != supervisor:
        os._exit(1)


def create_app() -> MuseApp:
    """Factory for Granian workers: the settings `muse serve` parsed."""
    _stop_with_the_supervisor()
    return MuseApp(from_environment())
