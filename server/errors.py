"""Errors a request can meet, as HTTP responses: a status, a message and the JSON
path of the field at fault (``$.events[3].features``)."""

from __future__ import annotations

import re

import msgspec

from muse.core.predictor import Predictor
from muse.core.snapshot import RouteError, Snapshot

from .schemas import ErrorBody

Headers = list[tuple[bytes, bytes]]
RETRY_AFTER: Headers = [(b"retry-after", b"1")]
REASONS = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    408: "body_timeout",
    413: "too_large",
    415: "unsupported_encoding",
    429: "over_quota",
    422: "invalid",
    503: "overloaded",
}  # muse_request_errors_total{reason}
_ENCODER = msgspec.json.Encoder()
_AT_PATH = re.compile(r" - at `(\$[^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


class HTTPError(Exception):
    """A response other than 200, raised anywhere in a handler."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: Headers | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or []

    def body(self) -> bytes:
        return _ENCODER.encode(ErrorBody(self.message, self.field))


def validation_error(exc: msgspec.ValidationError | msgspec.DecodeError, status: int = 422) -> HTTPError:
    """A decoding failure as a 4xx naming the field at fault.  msgspec gives the path only in
    its message (``... - at `$.events[3].features```; a missing field as ``missing required
    field `x``` at its parent's path), so this adapter reads it from there (tests check it on
    generated errors)."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        match = _AT_PATH.search(text)
        path = match.group(1) if match else "$"
        missing = _MISSING.search(text)
        if missing:
            path = f"{path}.{missing.group(1)}"
        return HTTPError(status, text, path)
    return HTTPError(400, f"malformed JSON: {text}", "$")


def not_ready() -> HTTPError:
    return HTTPError(503, "not ready: no deployment is loaded yet (`muse deploy apply`)", None, RETRY_AFTER)


def no_route(exc: RouteError, snap: Snapshot, intent: str, intent_field: str) -> HTTPError:
    return HTTPError(404, str(exc), intent_field if intent not in snap.intents else "$.tenant")


def check_version(predictor: Predictor, intent: str, version: str | None) -> None:
    if version is not None and version != predictor.version:
        raise HTTPError(
            404, f"intent {intent!r} is served by version {predictor.version!r}, not {version!r}", "version"
        )
