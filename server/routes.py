"""Routing: a table of endpoints that drives both dispatch and the OpenAPI
document's paths (server/openapi.py); the app's own table is in server/app.py.  Paths are templates
(``/v2/models/{intent}/infer``); their parameters reach the handler as
keyword arguments.  GET endpoints answer HEAD too."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

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
