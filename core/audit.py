"""The registry's audit trail: REGISTRY/audit/, one JSON file per record, written whole."""

from __future__ import annotations

import datetime
import getpass
import os
import pathlib
import secrets
import socket

import msgspec

from .files import write_atomic
from .registry import Registry


class EdgeRecord(msgspec.Struct):
    edge: float
    target: float
    before: float
    after: float


class MapRecord(msgspec.Struct, omit_defaults=True):
    tenant: str | None
    rows: int
    newest_rows: int
    outcome: str  # "fitted", "kept previous", "uses all-traffic map"
    edges: list[EdgeRecord] = []
    problems: list[str] = []


class AuditRecord(msgspec.Struct, omit_defaults=True):
    """One refresh, as REGISTRY/audit/<time>-refresh-<predictor>.json."""

    action: str  # "refresh"
    outcome: str  # "published" | "refused" | "failed"
    predictor: str
    who: str
    trigger: str  # "manual", "schedule", "drift"
    at: str
    policy: dict[str, object]
    window_start: str | None
    window_end: str | None
    rows: int
    base_generation: int
    maps: list[MapRecord]
    small_tenants: int = 0  # tenants with too few rows for a map of their own, using the all-traffic map
    generation: int | None = None
    calibration: str | None = None
    reasons: list[str] = []


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def write_audit(reg: Registry, record: AuditRecord) -> pathlib.Path:
    """Append ``record`` to REGISTRY/audit/ as its own file (written whole: temp, fsync, rename)."""
    directory = reg.root / "audit"
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = directory / f"{stamp}-{record.action}-{record.predictor}-{secrets.token_hex(3)}.json"
    return write_atomic(path, msgspec.json.format(msgspec.json.encode(record), indent=1) + b"\n")
