"""The Open Inference Protocol (KServe v2) endpoints of an intent: metadata,
readiness and inference, with JSON tensors or the binary tensor extension.
The tenant comes from the key, or from ``parameters.tenant`` with an admin key.

The protocol has no per-row ids: the score log's event id of row i is
``<prefix>-<i>``, where the prefix is the request's ``id`` when the client sent one
that can be (1 to 128 printable ASCII characters without spaces), else the request
id of the access log (server/asgi.py ``Request.id``).  The answer's ``id`` echoes the
client's (the protocol's rule), or is the request id when it sent none, and
``parameters.event_id_prefix`` is the prefix, so a client can rebuild its rows'
event ids; the score log's ``request_id`` is the access log's either way."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import msgspec
import numpy as np

from muse.calib.names import too_deep
from muse.core.predictor import Predictor
from muse.core.snapshot import RouteError

from .asgi import Request, Response, encode, json_response
from .context import Context
from .errors import HTTPError, check_version, no_route, validation_error
from .schemas import InferOutput, InferRequest, InferResponse, ModelMetadata, TensorMeta, usable_request_id

DECODER = msgspec.json.Decoder(InferRequest)
TENSOR_DTYPES: dict[str, np.dtype[np.floating[Any]]] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}


async def metadata(app: Context, req: Request, intent: str, version: str | None = None) -> Response:
    predictor, generation = _active(app, req, intent, version)
    return json_response(
        ModelMetadata(
            name=intent,
            versions=[predictor.version],
            platform="muse_tree_ensemble",
            inputs=[TensorMeta("features", "FP64", [-1, predictor.num_feature])],
            outputs=[TensorMeta("score", "FP64", [-1])],
            parameters={
                "predictor": predictor.name,
                "features": list(predictor.feature_names),
                "generation": generation,
            },
        )
    )


async def ready(app: Context, req: Request, intent: str, version: str | None = None) -> Response:
    _active(app, req, intent, version)
    return json_response({"name": intent, "ready": True})


def _active(app: Context, req: Request, intent: str, version: str | None) -> tuple[Predictor, int]:
    """The predictor answering the key's tenant (or the default route) on ``intent``."""
    principal = app.authenticate_scorer(req)
    snap = app.snapshot()
    try:
        predictor = snap.route(principal.tenant or "*", intent).active
    except RouteError as exc:
        raise no_route(exc, snap, intent, "$.intent") from None
    check_version(predictor, intent, version)
    return predictor, snap.generation


async def infer(app: Context, req: Request, intent: str, version: str | None = None) -> Response:
    started = time.perf_counter()
    tenant, predictor_name = "", ""
    try:
        principal = app.authenticate_scorer(req)
        if principal.tenant is not None:  # the key names the tenant: refuse before reading the body
            tenant = principal.tenant
            app.check_quota(tenant, "$.parameters.tenant")
        body, binary = _split_body(await req.body(), req.headers.get(b"inference-header-content-length"))
        app.check_json_size(len(body), "$")
        r = decode_infer_request(body)
        claimed = r.parameters.get("tenant")
        if claimed is None:  # absent, or null
            claimed = principal.tenant
        if claimed is None:
            raise HTTPError(
                422, "parameters.tenant: required (a string) unless the key belongs to a tenant", "$.parameters.tenant"
            )
        app.check_tenant(principal, claimed, "$.parameters.tenant")
        assert isinstance(claimed, str)  # check_tenant refuses anything else
        tenant = claimed  # a metrics label from here on: a valid tenant name, the key's own
        lane = req.lane = app.lane(tenant, intent, version, "model_name")
        predictor = lane.predictor
        predictor_name = predictor.name
        X = infer_matrix(r, binary, predictor.num_feature)
        binary_out = wants_binary(r)
        scores = await app.score_within_quota(lane, X, "$.parameters.tenant")
        request_id = req.id
        named = r.id if r.id is not None and usable_request_id(r.id) else None
        lane.record(X, scores, (request_id, named, None))  # event ids: <named or request id>-<row>
        prefix = named or request_id
        params = {"predictor": predictor.name, "generation": lane.generation, "event_id_prefix": prefix}
        if binary_out:
            raw = scores.mapped.astype("<f8").tobytes()
            output = InferOutput("score", [len(X)], "FP64", parameters={"binary_data_size": len(raw)})
        else:
            raw = b""
            output = InferOutput("score", [len(X)], "FP64", data=scores.mapped.tolist())
        answered_id = r.id if r.id is not None else request_id
        header = encode(InferResponse(intent, [output], predictor.version, answered_id, params))
    except HTTPError as exc:
        app.count_error(exc, tenant or "", intent, predictor_name)
        raise
    lane.metrics.observe(len(X), time.perf_counter() - started, len(body) + len(binary))
    if binary_out:
        return (
            200,
            header + raw,
            b"application/octet-stream",
            [(b"inference-header-content-length", str(len(header)).encode())],
        )
    return 200, header, b"application/json", None


def _split_body(body: bytes, header_length: bytes | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tensors): the binary extension puts raw tensors after the JSON."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit() or len(header_length) > 18 or int(header_length) > len(body):
        raise HTTPError(
            400, "inference-header-content-length: not a length within the body", "inference-header-content-length"
        )
    split = int(header_length)
    return body[:split], memoryview(body)[split:]


def decode_infer_request(body: bytes) -> InferRequest:
    """The request, typed like /v1's: numbers only (no strings, no booleans), tensors flat or
    as rows, parameters scalars; errors name the field.  Nothing nests deeper than the schema:
    msgspec refuses a level too many before it reads it (a RecursionError, possible only in
    fields the schema skips, is a 400 naming the limit)."""
    try:
        return DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except RecursionError:
        raise HTTPError(400, str(too_deep("request body")), "$") from None
    except msgspec.DecodeError as exc:
        # Not JSON.  Python's json (and so tritonclient's JSON tensors) writes NaN and Infinity as
        # bare literals: read them only to say what to send instead, as /v1 refuses them too.
        literals: list[str] = []

        def literal(name: str) -> str:
            literals.append(name)
            return name

        try:
            obj = json.loads(body, parse_constant=literal)
        except RecursionError:
            raise HTTPError(400, str(too_deep("request body")), "$") from None
        except ValueError:
            raise validation_error(exc) from None
        if not literals:
            raise validation_error(exc) from None
        field = "$"
        try:
            msgspec.convert(obj, InferRequest)  # to find where: a literal in a tensor is a string there
        except msgspec.ValidationError as exc2:
            field = _invalid(exc2).field or field
        except RecursionError:
            raise HTTPError(400, str(too_deep("request body")), "$") from None
        raise HTTPError(
            422,
            f"{literals[0]} is not a JSON number: send null for a missing value, or the tensor as binary data "
            "(the binary tensor extension carries NaN and infinities)",
            field,
        ) from None


_DATA_PATH = re.compile(r"^(\$\.inputs\[\d+\]\.data)\[")


def _invalid(exc: msgspec.ValidationError) -> HTTPError:
    """A 422 naming the field; within a tensor's data, the tensor (the message names the element)."""
    error = validation_error(exc)
    within_data = _DATA_PATH.match(error.field or "")
    if within_data is None:
        return error
    message = f"{error.message}; data holds numbers (null for missing), flat or as rows of a [N, F] shape"
    return HTTPError(422, message, within_data.group(1))


def infer_matrix(r: InferRequest, binary: memoryview, num_feature: int) -> np.ndarray:
    if len(r.inputs) != 1:
        raise HTTPError(
            422, f"expected exactly one input tensor of shape [N, {num_feature}], got {len(r.inputs)}", "$.inputs"
        )
    tensor = r.inputs[0]
    shape = tensor.shape
    if len(shape) != 2 or shape[1] != num_feature or shape[0] < 1:
        raise HTTPError(422, f"shape must be [N, {num_feature}] with N >= 1, got {shape}", "$.inputs[0].shape")
    dtype = TENSOR_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise HTTPError(422, f"datatype must be FP32 or FP64, got {tensor.datatype!r}", "$.inputs[0].datatype")
    count = shape[0] * shape[1]
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != count * dtype.itemsize or size > len(binary):
            raise HTTPError(
                422,
                f"binary_data_size {size} does not hold a {tensor.datatype} tensor of shape {shape} "
                f"({count * dtype.itemsize} bytes; {len(binary)} bytes follow the header)",
                "$.inputs[0].parameters.binary_data_size",
            )
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


def wants_binary(r: InferRequest) -> bool:
    default = bool(r.parameters.get("binary_data_output", False))
    for i, out in enumerate(r.outputs):
        if out.name != "score":
            raise HTTPError(422, f"unknown output {out.name!r}; the only output is 'score'", f"$.outputs[{i}].name")
    if r.outputs:
        return bool(r.outputs[0].parameters.get("binary_data", default))
    return default
