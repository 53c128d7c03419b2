"""The admin API (admin key only): read the live deployment; validate, apply,
promote and roll back, each published as a new generation that this worker
serves before it answers."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from muse.calib.names import too_deep
from muse.core.spec import DeploymentSpec, SpecError, decode_spec

from .asgi import Request, Response, json_response
from .context import Context
from .errors import HTTPError, validation_error
from .schemas import PromoteRequest, RollbackRequest

T = TypeVar("T")


async def get_deployment(app: Context, req: Request) -> Response:
    app.admin(req)
    snap = app.snapshot()
    return json_response(
        {"generation": snap.generation, "deployment": msgspec.to_builtins(snap.spec), "refused": app.serving.last_error}
    )


async def validate_deployment(app: Context, req: Request) -> Response:
    app.admin(req)
    spec = await _spec_from_body(req)
    await app.in_loader(app.serving.store.validate, spec)
    return json_response({"valid": True})


async def apply_deployment(app: Context, req: Request) -> Response:
    """Validate, publish as the next generation, and serve it from this worker before answering."""
    app.admin(req)
    spec = await _spec_from_body(req)
    return await _published(app, await app.in_loader(app.serving.store.apply, spec))


async def promote(app: Context, req: Request) -> Response:
    """{"predictor": NAME, "tenants": [..]?}: publish a generation where NAME is active."""
    app.admin(req)
    body = _decode(await req.body(), PromoteRequest)
    return await _published(app, await app.in_loader(app.serving.store.promote, body.predictor, body.tenants))


async def rollback(app: Context, req: Request) -> Response:
    """{"to": N}? : publish generation N again (default: the one before the current)."""
    app.admin(req)
    body = _decode(await req.body() or b"{}", RollbackRequest)
    return await _published(app, await app.in_loader(app.serving.store.rollback, body.to))


async def _spec_from_body(req: Request) -> DeploymentSpec:
    """A deployment as TOML or JSON (by content type), within the document limits of
    muse.calib.names (decode_spec says which it exceeds); 422 naming the entry otherwise."""
    kind = req.headers.get(b"content-type", b"application/json").split(b";")[0].strip()
    source = "request.json" if kind == b"application/json" else "request.toml"
    try:
        return decode_spec(await req.body(), source)
    except SpecError as exc:
        raise HTTPError(422, str(exc), "$") from None


def _decode(raw: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise validation_error(exc) from None
    except RecursionError:  # defence in depth: these schemas forbid unknown fields and nest 2 deep
        raise HTTPError(400, str(too_deep("request body")), "$") from None


async def _published(app: Context, generation: int) -> Response:
    await app.serving.refresh()
    snap = app.serving.snapshot
    if snap is None or snap.generation != generation:
        raise HTTPError(
            409,
            f"generation {generation} was published but is not the one serving; "
            f"see {app.serving.last_error or 'a newer generation'}",
        )
    return json_response({"generation": generation, "description": snap.spec.description})
