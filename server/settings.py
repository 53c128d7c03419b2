"""A server's settings: one typed value, parsed once by `muse serve` from its
command line and handed to every worker process, where the app is built from it.

Granian builds the app in each worker by calling a factory with no arguments,
so the settings travel as one environment variable holding their JSON; the
worker decodes (and so validates) them once.  Defaults are written here only:
`muse serve`'s flags take theirs from this type."""

from __future__ import annotations

import os
from typing import Annotated

import msgspec

ENV = "MUSE_SETTINGS"
SUPERVISOR_ENV = "MUSE_SUPERVISOR_PID"  # `muse serve`'s pid, for its workers (server/app.py)

Positive = Annotated[float, msgspec.Meta(gt=0)]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    registry: str
    workers: Annotated[int, msgspec.Meta(ge=1)] = 1  # worker processes: each holds 1/workers of every quota
    auth: bool = True  # False: scoring needs no key (local demos only); the admin API still wants one
    metrics_auth: bool = False  # /metrics wants an admin or metrics key
    tenant_labels: bool = True  # False: metrics carry no tenant names (tenant = "")
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1)] = 16 << 20  # larger requests get 413
    # JSON is decoded on the event loop, holding the GIL (~5 ns a byte: 1 MiB stalls every other
    # request ~5 ms; a thread would not help, msgspec keeps the GIL throughout); larger JSON gets
    # 413, and big batches go as binary tensors (OIP) instead
    max_json_bytes: Annotated[int, msgspec.Meta(ge=1)] = 1 << 20
    body_timeout: Positive = 10.0  # seconds for a request's body to arrive; slower ones get 408
    access_log: bool = False  # a log line per request
    poll_interval: Positive = 0.25  # seconds between looks at deployments/current
    shadow_queue: Annotated[int, msgspec.Meta(ge=1)] = 8192  # shadow work beyond this is dropped and counted
    score_log: str | None = None  # directory of the score log; None: no log
    score_log_sample: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0  # fraction of requests logged
    score_log_max_bytes: Annotated[int, msgspec.Meta(ge=1)] = 1 << 30  # oldest files deleted beyond this
    score_log_flush_seconds: Positive = 10.0  # the longest a logged score waits in memory


DEFAULTS = Settings(registry="")


def to_environment(settings: Settings) -> None:
    """Hand ``settings`` to the worker processes about to be started from this one."""
    os.environ[ENV] = msgspec.json.encode(settings).decode()


def from_environment() -> Settings:
    """The settings `muse serve` handed to this worker."""
    raw = os.environ.get(ENV)
    if not raw:
        raise RuntimeError(f"{ENV} is not set; start the server with `muse serve --registry DIR`")
    try:
        return msgspec.json.decode(raw, type=Settings)
    except msgspec.ValidationError as exc:
        raise RuntimeError(f"{ENV}: invalid settings ({exc})") from None
