"""The registry: plain files in a documented layout, reviewable in git.

    REGISTRY/
      models/NAME/VERSION/            manifest.json + libNAME-VERSION-HASH.so  (muse compile)
      references/NAME.toml            reference distributions, one per intent
      calibrations/NAME/VERSION/      calibration.json (all traffic) and
                                      tenants/TENANT.json (per-tenant maps; the tenant
                                      name encoded, muse.calib.names.tenant_file_stem)
      deployments/GENERATION.toml     every applied deployment, numbered
      deployments/current             the generation being served
      keys.toml                       hashed API keys (muse keys)
      labels/labels-SEQUENCE.parquet  imported labels, one file per import, the last wins (muse.core.labels)

The same layout on object storage (s3://bucket/prefix) is used through a local mirror: see
core/remote.py.

Versions are directory names; "latest" means the highest numeric version.
Nothing is ever rewritten in place: a new version is a new directory.  A
calibration version is written whole (Registry.publish_calibration): staged in
calibrations/NAME/.staging-VERSION-..., then renamed into place; names that
start with "." are never versions, so a staging folder left by a crash is
ignored (delete it at leisure).
Every name that becomes a path is checked first (muse.calib.names: check_name,
and tenant names encoded), so no argument can name a file outside the registry."""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
from collections.abc import Sequence

from muse.calib import Calibration, ReferenceFile, load_reference, read_calibration
from muse.calib.artifact import write_calibration
from muse.calib.names import check_name, tenant_file_stem, tenant_from_file_stem
from muse.compile import CompiledModel, load_artifact

from .files import fsync_path
from .remote import Mirror


class RegistryError(LookupError):
    """Something named that the registry does not hold."""


def _versions(directory: pathlib.Path) -> list[str]:
    if not directory.is_dir():
        return []
    names = [p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(names, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))


def _version_dir(base: pathlib.Path, kind: str, name: str, version: str | None, fix: str) -> pathlib.Path:
    """base/name/version, the highest version when none is given; errors say what exists."""
    check_name(f"{kind} name", name)
    if version:
        check_name(f"{kind} version", version)
    versions = _versions(base / name)
    if not versions:
        raise RegistryError(f"{kind} {name!r} is not in {base}; {fix}")
    version = version or versions[-1]
    if version not in versions:
        raise RegistryError(f"{kind} {name!r} has no version {version!r} (have: {', '.join(versions)})")
    return base / name / version


def _split_ref(kind: str, ref: str) -> tuple[str, str | None]:
    """NAME or NAME/VERSION as (name, version or None), each part a valid name."""
    name, _, version = ref.partition("/")
    try:
        check_name(f"{kind} name", name)
        if version:
            check_name(f"{kind} version", version)
    except ValueError as exc:
        raise ValueError(f"{kind} {ref!r} is not NAME or NAME/VERSION: {exc}") from None
    return name, version or None


class Registry:
    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)
        # a registry at a URL is used through its local mirror (core/remote.py), which knows the URL
        self.mirror = Mirror.of(self.root)

    # -- paths -------------------------------------------------------------
    @property
    def models_dir(self) -> pathlib.Path:
        return self.root / "models"

    @property
    def references_dir(self) -> pathlib.Path:
        return self.root / "references"

    @property
    def calibrations_dir(self) -> pathlib.Path:
        return self.root / "calibrations"

    @property
    def deployments_dir(self) -> pathlib.Path:
        return self.root / "deployments"

    @property
    def score_log(self) -> pathlib.Path | str:
        """Where servers log scores by default: REGISTRY/scorelog, or on object storage the URL
        their files are uploaded under (scorelog/replica=ID/, server/replica.py)."""
        return f"{self.mirror.url}/scorelog" if self.mirror is not None else self.root / "scorelog"

    # -- models ------------------------------------------------------------
    def model_dir(self, name: str, version: str | None = None) -> pathlib.Path:
        return _version_dir(self.models_dir, "model", name, version, "compile it with `muse compile`")

    def load_model(self, ref: str) -> CompiledModel:
        """``ref`` is NAME or NAME/VERSION."""
        return load_artifact(self.model_dir(*_split_ref("model", ref)))

    # -- references ----------------------------------------------------------
    def reference_path(self, name: str) -> pathlib.Path:
        return self.references_dir / f"{check_name('reference name', name)}.toml"

    def load_reference(self, name_or_path: str) -> ReferenceFile:
        """A reference by name (references/NAME.toml), or from a .toml/.json file given by path."""
        path = pathlib.Path(name_or_path)
        if not (path.suffix in (".toml", ".json") and path.exists()):
            try:
                path = self.reference_path(name_or_path)
            except ValueError as exc:
                raise ValueError(f"{exc}; or give the path of a .toml/.json reference file") from None
            if not path.exists():
                known = sorted(p.stem for p in self.references_dir.glob("*.toml"))
                have = ", ".join(known) or "none"
                raise RegistryError(f"reference {name_or_path!r} not found in {self.references_dir} (have: {have})")
        return load_reference(str(path))  # within the document limits

    # -- calibrations --------------------------------------------------------
    def calibration_dir(self, name: str, version: str | None = None) -> pathlib.Path:
        return _version_dir(self.calibrations_dir, "calibration", name, version, "fit it with `muse calib fit`")

    def next_calibration_version(self, name: str) -> str:
        versions = _versions(self.calibrations_dir / check_name("calibration name", name))
        numeric = [int(v) for v in versions if v.isdigit()]
        return str(max(numeric, default=0) + 1)

    @staticmethod
    def _calibration_file(directory: pathlib.Path, tenant: str | None) -> pathlib.Path:
        if tenant is None:
            return directory / "calibration.json"
        return directory / "tenants" / f"{tenant_file_stem(tenant)}.json"

    def load_calibration(self, ref: str, tenant: str | None = None) -> Calibration:
        return read_calibration(self._calibration_file(self.calibration_dir(*_split_ref("calibration", ref)), tenant))

    def calibration_tenants(self, ref: str) -> list[str]:
        """The tenants with a map of their own in calibration ``ref``, decoded from the file names."""
        directory = self.calibration_dir(*_split_ref("calibration", ref)) / "tenants"
        tenants = []
        for path in directory.glob("*.json"):
            try:
                tenants.append(tenant_from_file_stem(path.stem))
            except ValueError:
                fix = "remove it or refit"
                with contextlib.suppress(ValueError):
                    fix = f"rename it to {tenant_file_stem(path.stem)}.json"
                raise RegistryError(
                    f"{path}: not a tenant calibration file name (tenant names are encoded, "
                    f"see muse.calib.names.tenant_file_stem); {fix}"
                ) from None
        return sorted(tenants)

    def publish_calibration(self, cals: Sequence[Calibration]) -> pathlib.Path:
        """Write one calibration version whole, atomically: its all-traffic map (``cals[0]``,
        tenant None) and any per-tenant maps, staged in a hidden folder beside the versions
        and renamed into place.  The version either appears complete or not at all; it is
        never overwritten (FileExistsError).  Returns the version's directory."""
        if not cals or cals[0].tenant is not None:
            raise ValueError("a calibration version needs its all-traffic map first")
        name, version = cals[0].name, cals[0].version
        if any((c.name, c.version) != (name, version) for c in cals):
            raise ValueError(f"calibrations of one version must all be {name}/{version}")
        base = self.calibrations_dir / check_name("calibration name", name)
        target = base / check_name("calibration version", version)
        exists = (
            f"calibration {name}/{version} already exists ({target}): calibrations are immutable, pick a new version"
        )
        if target.exists():
            raise FileExistsError(exists)
        base.mkdir(parents=True, exist_ok=True)
        staging = base / f".staging-{version}-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            for cal in cals:
                write_calibration(cal, self._calibration_file(staging, cal.tenant))
            fsync_path(staging)
            if (staging / "tenants").is_dir():
                fsync_path(staging / "tenants")
            try:
                # rename(2) replaces an empty directory: refuse one that appeared since the check
                if target.exists():
                    raise FileExistsError(exists)
                staging.rename(target)
            except OSError as exc:  # ENOTEMPTY/EEXIST: another fit published this version meanwhile
                if target.exists():
                    raise FileExistsError(exists) from None
                raise exc
            fsync_path(base)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def save_calibration(self, cal: Calibration) -> pathlib.Path:
        directory = self.calibrations_dir / check_name("calibration name", cal.name)
        directory = directory / check_name("calibration version", cal.version)
        return write_calibration(cal, self._calibration_file(directory, cal.tenant))
