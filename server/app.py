"""The ASGI app: native scoring, the Open Inference Protocol, health, metrics,
OpenAPI and the admin API, in one small dispatcher.

Every request is decoded by one msgspec decoder per type; every failure a
client can cause is an HTTPError with a 4xx status and the JSON path of the
field at fault.  Anything else is a 500 that is logged and counted, and it
fails only its own request."""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import msgspec
import numpy as np

from muse.compile import rows_matrix
from muse.core.batching import Overloaded
from muse.core.registry import Registry
from muse.core.snapshot import RouteError, Snapshot
from muse.core.spec import DeploymentSpec, SpecError, decode_spec

from . import openapi
from .asgi import HTTPError, Request, encode, send, validation_error
from .auth import Authenticator, AuthError, Principal, keys_path
from .drift import monitor_edges
from .metrics import CONTENT_TYPE, Metrics
from .schemas import (
    InferOutput, InferRequest, InferResponse, ModelMetadata, PromoteRequest, RollbackRequest, ScoreRequest,
    ScoreResponse, ServerMetadata, TensorMeta,
)
from .scorelog import ScoreLog
from .serving import Lane, Serving
from .settings import Settings, from_environment

log = logging.getLogger("muse.serve")

SCORE_DECODER = msgspec.json.Decoder(ScoreRequest)
INFER_DECODER = msgspec.json.Decoder(InferRequest)
SERVER_VERSION = "0.1.0"
RETRY_AFTER = [(b"retry-after", b"1")]
REASONS = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found", 413: "too_large",
           415: "unsupported_encoding",
           422: "invalid", 503: "overloaded"}


class MuseApp:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = Registry(settings.registry)
        self.metrics = Metrics()
        self.auth = Authenticator(keys_path(self.registry.root) if settings.auth else None)
        score_log = None
        if settings.score_log is not None:
            score_log = ScoreLog(settings.score_log, sample=settings.score_log_sample,
                                 max_bytes=settings.score_log_max_bytes, flush_seconds=settings.score_log_flush_seconds)
        self.serving = Serving(self.registry, self.metrics, settings.poll_interval, settings.shadow_queue,
                               score_log=score_log, on_poll=self.auth.reload)  # added and revoked keys apply within a poll
        self.max_body = settings.max_body_bytes
        self._get = {
            "/v2": self.server_metadata,
            "/v2/health/live": self.live,
            "/v2/health/ready": self.ready,
            "/metrics": self.render_metrics,
            "/openapi.json": self.openapi,
            "/admin/deployment": self.get_deployment,
        }
        self._post = {
            "/v1/score": self.score,
            "/admin/deployment": self.apply_deployment,
            "/admin/deployment/validate": self.validate_deployment,
            "/admin/promote": self.promote,
            "/admin/rollback": self.rollback,
        }

    # -- ASGI ----------------------------------------------------------------------
    async def __call__(self, scope, receive, send_fn) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send_fn)
        if scope["type"] != "http":
            return
        req = Request(scope, receive, self.max_body)
        try:
            status, body, content_type, headers = await self._dispatch(req)
        except HTTPError as exc:
            status, body, content_type, headers = exc.status, exc.body(), b"application/json", exc.headers
        except ConnectionAbortedError:
            return
        except Exception:
            log.exception("%s %s", req.method, req.path)
            self.metrics.errors.labels("", "", "", "internal").inc()
            status, body = 500, HTTPError(500, "internal error; see the server log").body()
            content_type, headers = b"application/json", None
        await send(send_fn, status, body, content_type, headers)

    async def _lifespan(self, receive, send_fn) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.serving.start()
                except Exception as exc:
                    log.exception("start-up")
                    await send_fn({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send_fn({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.serving.stop()
                await send_fn({"type": "lifespan.shutdown.complete"})
                return

    async def _dispatch(self, req: Request):
        table = self._post if req.method == "POST" else self._get if req.method in ("GET", "HEAD") else None
        handler = table.get(req.path) if table is not None else None
        if handler is not None:
            return await handler(req)
        if req.path.startswith("/v2/models/"):
            return await self._model_endpoint(req)
        allowed = [m for m, t in (("GET", self._get), ("POST", self._post)) if req.path in t]
        if allowed:
            raise _not_allowed(req, allowed)
        raise HTTPError(404, f"no endpoint {req.path}")

    async def _model_endpoint(self, req: Request):
        # /v2/models/{intent}[/versions/{v}][/ready | /infer]
        parts = req.path[len("/v2/models/"):].split("/")
        intent, rest, version = parts[0], parts[1:], None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = rest[0] if rest else ""
        if len(rest) > 1 or action not in ("", "ready", "infer"):
            raise HTTPError(404, f"no endpoint {req.path}")
        wanted = ("POST",) if action == "infer" else ("GET", "HEAD")
        if req.method not in wanted:
            raise _not_allowed(req, ["POST"] if action == "infer" else ["GET"])
        if action == "infer":
            return await self.infer(req, intent, version)
        principal = self._authenticate(req)
        snap = self._snapshot()
        try:
            predictor = snap.route(principal.tenant or "*", intent).active
        except RouteError as exc:
            raise _no_route(exc, snap, intent, "$.intent") from None
        _check_version(predictor, intent, version)
        if action == "ready":
            return 200, encode({"name": intent, "ready": True}), b"application/json", None
        meta = ModelMetadata(
            name=intent, versions=[predictor.version], platform="muse_tree_ensemble",
            inputs=[TensorMeta("features", "FP64", [-1, predictor.num_feature])],
            outputs=[TensorMeta("score", "FP64", [-1])],
            parameters={"predictor": predictor.name, "features": list(predictor.feature_names),
                        "generation": snap.generation},
        )
        return 200, encode(meta), b"application/json", None

    # -- helpers -------------------------------------------------------------------
    def _authenticate(self, req: Request) -> Principal:
        try:
            return self.auth.authenticate(req.headers)
        except AuthError as exc:
            raise HTTPError(exc.status, str(exc), "authorization", [(b"www-authenticate", b"Bearer")]) from None

    def _snapshot(self) -> Snapshot:
        snap = self.serving.snapshot
        if snap is None:
            raise _not_ready()
        return snap

    def _lane(self, tenant: str, intent: str, version: str | None, intent_field: str) -> Lane:
        try:
            lane = self.serving.lane(tenant, intent)
        except RouteError as exc:
            raise _no_route(exc, self.serving.snapshot, intent, intent_field) from None
        if lane is None:
            raise _not_ready()
        _check_version(lane.predictor, intent, version)
        return lane

    def _check_tenant(self, principal: Principal, tenant: str, field: str) -> None:
        if principal.tenant is not None and tenant != principal.tenant:
            raise HTTPError(403, f"this key belongs to tenant {principal.tenant!r} and cannot score for {tenant!r}",
                            field)

    # -- native scoring --------------------------------------------------------------
    async def score(self, req: Request):
        started = time.perf_counter()
        tenant = intent = predictor_name = ""
        try:
            principal = self._authenticate(req)
            try:
                r = SCORE_DECODER.decode(await req.body())
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise validation_error(exc) from None
            tenant, intent = r.tenant, r.intent
            self._check_tenant(principal, tenant, "$.tenant")
            lane = self._lane(tenant, intent, None, "$.intent")
            predictor = lane.predictor
            predictor_name = predictor.name
            X = events_matrix(r.events, predictor.feature_index, predictor.feature_names)
            scores = await self._score(lane, X)
            body = encode(ScoreResponse(predictor.name, predictor.version, lane.generation,
                                        scores[2].tolist(), _ids(r.events)))
        except HTTPError as exc:
            self.metrics.observe_error(tenant, intent, predictor_name, exc.status, REASONS.get(exc.status, "error"))
            raise
        lane.metrics.observe(len(X), time.perf_counter() - started)
        return 200, body, b"application/json", None

    async def _score(self, lane: Lane, X: np.ndarray) -> np.ndarray:
        """[3, n] scores of X on the lane's active predictor, recorded, and X queued for its shadows."""
        try:
            scores = await lane.predictor.score(X, lane.map_index)
        except Overloaded as exc:
            raise HTTPError(503, f"overloaded: {exc}; retry later", None, RETRY_AFTER) from None
        lane.served.add(scores)
        if lane.route.shadows:
            self.serving.shadow(lane.route, X, lane.tenant, lane.generation)
        return scores

    # -- Open Inference Protocol -------------------------------------------------------
    async def infer(self, req: Request, intent: str, version: str | None):
        started = time.perf_counter()
        tenant, predictor_name = "", ""
        try:
            principal = self._authenticate(req)
            body = await req.body()
            header_length = req.headers.get(b"inference-header-content-length")
            if header_length is not None:  # binary tensor extension: JSON header, then raw tensors
                if not header_length.isdigit() or int(header_length) > len(body):
                    raise HTTPError(400, "inference-header-content-length: not a length within the body",
                                    "inference-header-content-length")
                split = int(header_length)
                body, binary = body[:split], memoryview(body)[split:]
            else:
                binary = memoryview(b"")
            r = decode_infer_request(body)
            tenant = principal.tenant or r.parameters.get("tenant")
            if not isinstance(tenant, str) or not tenant:
                raise HTTPError(422, "parameters.tenant: required (a string) unless the key belongs to a tenant",
                                "$.parameters.tenant")
            self._check_tenant(principal, r.parameters.get("tenant", tenant), "$.parameters.tenant")
            lane = self._lane(tenant, intent, version, "model_name")
            predictor = lane.predictor
            predictor_name = predictor.name
            X = infer_matrix(r, binary, predictor.num_feature)
            binary_out = _wants_binary(r)
            scores = await self._score(lane, X)
            params = {"predictor": predictor.name, "generation": lane.generation}
            if binary_out:
                raw = scores[2].astype("<f8").tobytes()
                output = InferOutput("score", [len(X)], "FP64", parameters={"binary_data_size": len(raw)})
            else:
                raw = b""
                output = InferOutput("score", [len(X)], "FP64", data=scores[2].tolist())
            header = encode(InferResponse(intent, [output], predictor.version, r.id, params))
        except HTTPError as exc:
            self.metrics.observe_error(tenant or "", intent, predictor_name, exc.status,
                                       REASONS.get(exc.status, "error"))
            raise
        lane.metrics.observe(len(X), time.perf_counter() - started)
        if binary_out:
            return 200, header + raw, b"application/octet-stream", [
                (b"inference-header-content-length", str(len(header)).encode())]
        return 200, header, b"application/json", None

    async def server_metadata(self, req: Request):
        return 200, encode(ServerMetadata("muse", SERVER_VERSION, ["binary_tensor_data"])), b"application/json", None

    async def live(self, req: Request):
        return 200, encode({"live": True}), b"application/json", None

    async def ready(self, req: Request):
        snap = self.serving.snapshot
        if snap is None:
            raise HTTPError(503, "not ready: no deployment loaded yet", None, RETRY_AFTER)
        return 200, encode({"ready": True, "generation": snap.generation}), b"application/json", None

    async def render_metrics(self, req: Request):
        self.serving.record_served()  # the drift windows, up to this request
        snap = self.serving.snapshot
        if snap is not None:
            self.metrics.drift.update({intent: monitor_edges(ref) for intent, ref in snap.references.items()})
        return 200, self.metrics.render(), CONTENT_TYPE.encode(), None

    async def openapi(self, req: Request):
        return 200, openapi.document(SERVER_VERSION), b"application/json", None

    # -- admin ---------------------------------------------------------------------
    def _admin(self, req: Request) -> None:
        if not self._authenticate(req).admin:
            raise HTTPError(403, "the admin API needs an admin key (`muse keys add --admin`)", "authorization")

    async def get_deployment(self, req: Request):
        self._admin(req)
        snap = self._snapshot()
        body = {"generation": snap.generation, "deployment": msgspec.to_builtins(snap.spec),
                "refused": self.serving.last_error}
        return 200, encode(body), b"application/json", None

    async def _spec_from_body(self, req: Request) -> DeploymentSpec:
        kind = req.headers.get(b"content-type", b"application/json").split(b";")[0].strip()
        source = "request.json" if kind == b"application/json" else "request.toml"
        try:
            return decode_spec(await req.body(), source)
        except SpecError as exc:
            raise HTTPError(422, str(exc), "$") from None

    async def validate_deployment(self, req: Request):
        self._admin(req)
        spec = await self._spec_from_body(req)
        await self._in_loader(self.serving.store.validate, spec)
        return 200, encode({"valid": True}), b"application/json", None

    async def apply_deployment(self, req: Request):
        """Validate, publish as the next generation, and serve it from this worker before answering."""
        self._admin(req)
        spec = await self._spec_from_body(req)
        generation = await self._in_loader(self.serving.store.apply, spec)
        return await self._published(generation)

    async def promote(self, req: Request):
        """{"predictor": NAME, "tenants": [..]?}: publish a generation where NAME is active."""
        self._admin(req)
        body = self._admin_body(await req.body(), PromoteRequest)
        generation = await self._in_loader(self.serving.store.promote, body.predictor, body.tenants)
        return await self._published(generation)

    async def rollback(self, req: Request):
        """{"to": N}? : publish generation N again (default: the one before the current)."""
        self._admin(req)
        body = self._admin_body(await req.body() or b"{}", RollbackRequest)
        generation = await self._in_loader(self.serving.store.rollback, body.to)
        return await self._published(generation)

    @staticmethod
    def _admin_body(raw: bytes, kind):
        try:
            return msgspec.json.decode(raw, type=kind)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise validation_error(exc) from None

    async def _published(self, generation: int):
        await self.serving.refresh()
        snap = self.serving.snapshot
        if snap is None or snap.generation != generation:
            raise HTTPError(409, f"generation {generation} was published but is not the one serving; "
                                 f"see {self.serving.last_error or 'a newer generation'}")
        return 200, encode({"generation": generation, "description": snap.spec.description}), \
            b"application/json", None

    async def _in_loader(self, fn, *args):
        try:
            return await self.serving.in_background(fn, *args)
        except SpecError as exc:
            raise HTTPError(422, str(exc), "$") from None


def _not_allowed(req: Request, allowed: list[str]) -> HTTPError:
    methods = allowed + (["HEAD"] if "GET" in allowed else [])
    return HTTPError(405, f"method {req.method} not allowed on {req.path} (allowed: {', '.join(methods)})",
                     None, [(b"allow", ", ".join(methods).encode())])


def _not_ready() -> HTTPError:
    return HTTPError(503, "not ready: no deployment is loaded yet (`muse deploy apply`)", None, RETRY_AFTER)


def _no_route(exc: RouteError, snap: Snapshot, intent: str, intent_field: str) -> HTTPError:
    return HTTPError(404, str(exc), intent_field if intent not in snap.intents else "$.tenant")


def _check_version(predictor, intent: str, version: str | None) -> None:
    if version is not None and version != predictor.version:
        raise HTTPError(404, f"intent {intent!r} is served by version {predictor.version!r}, not {version!r}",
                        "version")


def _ids(events) -> list | None:
    """The events' ids in order, or None when no event has one (the usual case: nothing to echo)."""
    for event in events:
        if event.id is not None:
            return [e.id for e in events]
    return None


def events_matrix(events, index: dict[str, int], names: tuple[str, ...]) -> np.ndarray:
    """Rows in the model's feature order; positional lists or {name: value}; null = missing."""
    width = len(names)
    rows: list[Any] = []
    for i, event in enumerate(events):
        features = event.features
        if type(features) is list:
            if len(features) != width:
                raise HTTPError(422, f"expected {width} features in model order, got {len(features)}",
                                f"$.events[{i}].features")
            rows.append(features)
            continue
        row: list[Any] = [None] * width
        for name, value in features.items():
            j = index.get(name)
            if j is None:
                raise HTTPError(422, f"unknown feature {name!r}; the model's features are {', '.join(names)}",
                                f"$.events[{i}].features.{name}")
            row[j] = value
        if len(features) != width:
            missing = [n for n in names if n not in features]
            raise HTTPError(422, f"missing features {', '.join(missing)}; send null for a missing value",
                            f"$.events[{i}].features.{missing[0]}")
        rows.append(row)
    return rows_matrix(rows, width)


def decode_infer_request(body: bytes) -> InferRequest:
    try:
        return INFER_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise validation_error(exc) from None
    except msgspec.DecodeError as exc:
        # tritonclient writes NaN and Infinity as bare literals (Python's json does); accept them on a slow path.
        try:
            obj = json.loads(body)
        except ValueError:
            raise validation_error(exc) from None
        try:
            return msgspec.convert(obj, InferRequest)
        except msgspec.ValidationError as exc2:
            raise validation_error(exc2) from None


_TENSOR_DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}


def infer_matrix(r: InferRequest, binary: memoryview, num_feature: int) -> np.ndarray:
    if len(r.inputs) != 1:
        raise HTTPError(422, f"expected exactly one input tensor of shape [N, {num_feature}], got {len(r.inputs)}",
                        "$.inputs")
    tensor = r.inputs[0]
    shape = tensor.shape
    if len(shape) != 2 or shape[1] != num_feature or shape[0] < 1:
        raise HTTPError(422, f"shape must be [N, {num_feature}] with N >= 1, got {shape}", "$.inputs[0].shape")
    dtype = _TENSOR_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise HTTPError(422, f"datatype must be FP32 or FP64, got {tensor.datatype!r}", "$.inputs[0].datatype")
    count = shape[0] * shape[1]
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or size > len(binary):
            raise HTTPError(422, f"binary_data_size {size} does not hold a {tensor.datatype} tensor of shape {shape} "
                                 f"({count * dtype.itemsize} bytes; {len(binary)} bytes follow the header)",
                            "$.inputs[0].parameters.binary_data_size")
        return np.frombuffer(binary[:size], dtype=dtype).astype(np.float64).reshape(shape)
    if tensor.data is None:
        raise HTTPError(422, "data: required unless the tensor is sent as binary", "$.inputs[0].data")
    try:
        X = np.asarray(tensor.data, dtype=np.float64)
    except (TypeError, ValueError):
        raise HTTPError(422, "data: must be numbers (null for missing), flat or nested", "$.inputs[0].data") from None
    if X.size != count:
        raise HTTPError(422, f"data holds {X.size} values, shape {shape} needs {count}", "$.inputs[0].data")
    if dtype == np.float32:
        X = X.astype(np.float32).astype(np.float64)
    return X.reshape(shape)


def _wants_binary(r: InferRequest) -> bool:
    default = bool(r.parameters.get("binary_data_output", False))
    for i, out in enumerate(r.outputs):
        if out.name != "score":
            raise HTTPError(422, f"unknown output {out.name!r}; the only output is 'score'", f"$.outputs[{i}].name")
    if r.outputs:
        return bool(r.outputs[0].parameters.get("binary_data", default))
    return default


def create_app() -> MuseApp:
    """Factory for Granian workers: the settings `muse serve` parsed."""
    return MuseApp(from_environment())
