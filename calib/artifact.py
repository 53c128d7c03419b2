"""Calibration artifacts: a fitted map plus everything needed to trust it.

One JSON file per calibration, immutable once written.  The checksum covers
every other field, so a hand-edited or truncated file is refused on load."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import pathlib

import msgspec

from .names import LimitError, check_name, check_tenant, parse_document
from .quantile_map import QuantileMap
from .reference import Reference

FORMAT_VERSION = 1


class CalibrationError(ValueError):
    """A calibration file that must not be used."""


class ModelIdentity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The compiled model a map was fitted for (opaque to this layer)."""

    name: str
    version: str
    sha256: str


class Calibration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    version: str
    model: ModelIdentity
    reference_name: str
    reference: Reference
    beta: float
    knots_x: list[float]
    knots_y: list[float]
    sample_size: int
    tenant: str | None = None  # None: fitted on all tenants' traffic
    window_start: str | None = None
    window_end: str | None = None
    created_at: str = ""
    format_version: int = FORMAT_VERSION
    checksum: str = ""

    def __post_init__(self) -> None:
        # The names become the file's path in a registry (calibrations/NAME/VERSION/tenants/...).
        check_name("calibration name", self.name)
        check_name("calibration version", self.version)
        check_name("reference name", self.reference_name)
        if self.tenant is not None:
            check_tenant(self.tenant)

    def quantile_map(self) -> QuantileMap:
        return QuantileMap(self.knots_x, self.knots_y)


_encoder = msgspec.json.Encoder(order="deterministic")


def _digest(cal: Calibration) -> str:
    return hashlib.sha256(_encoder.encode(msgspec.structs.replace(cal, checksum=""))).hexdigest()


def make_calibration(
    qmap: QuantileMap,
    *,
    name: str,
    version: str,
    model: ModelIdentity,
    reference_name: str,
    reference: Reference,
    beta: float,
    sample_size: int,
    tenant: str | None = None,
    window: tuple[str | None, str | None] = (None, None),
) -> Calibration:
    cal = Calibration(
        name=name,
        version=version,
        model=model,
        reference_name=reference_name,
        reference=reference,
        beta=beta,
        knots_x=qmap.xs.tolist(),
        knots_y=qmap.ys.tolist(),
        sample_size=sample_size,
        tenant=tenant,
        window_start=window[0],
        window_end=window[1],
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return msgspec.structs.replace(cal, checksum=_digest(cal))


def carried_over(cal: Calibration, *, name: str, version: str) -> Calibration:
    """``cal``'s map, unchanged, as part of calibration version name/version (a refresh keeps a
    tenant's previous map when its new one is refused).  Its window and sample stay its own."""
    moved = msgspec.structs.replace(cal, name=name, version=version, checksum="")
    return msgspec.structs.replace(moved, checksum=_digest(moved))


def write_calibration(cal: Calibration, path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists: calibrations are immutable, pick a new version")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(msgspec.json.format(_encoder.encode(cal), indent=1) + b"\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before any rename makes it (or its version folder) visible
    tmp.rename(path)
    return path


def read_calibration(path: str | pathlib.Path) -> Calibration:
    path = pathlib.Path(path)
    try:
        cal = msgspec.convert(parse_document(path.read_bytes(), str(path), toml=False), Calibration)
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such calibration file") from None
    except LimitError as exc:
        raise CalibrationError(str(exc)) from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CalibrationError(f"{path}: not a valid calibration ({exc})") from None
    if cal.format_version != FORMAT_VERSION:
        raise CalibrationError(f"{path}: format_version {cal.format_version} is not supported ({FORMAT_VERSION})")
    if cal.checksum != _digest(cal):
        raise CalibrationError(f"{path}: checksum mismatch; the file was modified after it was written, refit it")
    try:
        cal.quantile_map()
    except ValueError as exc:
        raise CalibrationError(f"{path}: {exc}") from None
    return cal
