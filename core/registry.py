"""The registry: plain files in a documented layout, reviewable in git.

    REGISTRY/
      models/NAME/VERSION/            manifest.json + libNAME-VERSION-HASH.so  (muse compile)
      references/NAME.toml            reference distributions, one per intent
      calibrations/NAME/VERSION/      calibration.json (all traffic) and
                                      tenants/TENANT.json (per-tenant maps)
      deployments/GENERATION.toml     every applied deployment, numbered
      deployments/current             the generation being served
      keys.toml                       hashed API keys (muse keys)

Versions are directory names; "latest" means the highest numeric version.
Nothing is ever rewritten in place: a new version is a new directory."""

from __future__ import annotations

import pathlib

from muse.calib import Calibration, ReferenceFile, load_reference, read_calibration
from muse.calib.artifact import write_calibration
from muse.compile import CompiledModel, load_artifact


class RegistryError(LookupError):
    """Something named that the registry does not hold."""


def _versions(directory: pathlib.Path) -> list[str]:
    if not directory.is_dir():
        return []
    names = [p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(names, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))


def _version_dir(base: pathlib.Path, kind: str, name: str, version: str | None, fix: str) -> pathlib.Path:
    """base/name/version, the highest version when none is given; errors say what exists."""
    versions = _versions(base / name)
    if not versions:
        raise RegistryError(f"{kind} {name!r} is not in {base}; {fix}")
    version = version or versions[-1]
    if version not in versions:
        raise RegistryError(f"{kind} {name!r} has no version {version!r} (have: {', '.join(versions)})")
    return base / name / version


class Registry:
    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)

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

    # -- models ------------------------------------------------------------
    def model_dir(self, name: str, version: str | None = None) -> pathlib.Path:
        return _version_dir(self.models_dir, "model", name, version, "compile it with `muse compile`")

    def load_model(self, ref: str) -> CompiledModel:
        """``ref`` is NAME or NAME/VERSION."""
        name, _, version = ref.partition("/")
        return load_artifact(self.model_dir(name, version or None))

    # -- references ----------------------------------------------------------
    def reference_path(self, name: str) -> pathlib.Path:
        return self.references_dir / f"{name}.toml"

    def load_reference(self, name_or_path: str) -> ReferenceFile:
        path = pathlib.Path(name_or_path)
        if path.suffix in (".toml", ".json") and path.exists():
            return load_reference(str(path))
        if not self.reference_path(name_or_path).exists():
            known = sorted(p.stem for p in self.references_dir.glob("*.toml"))
            raise RegistryError(
                f"reference {name_or_path!r} not found in {self.references_dir} (have: {', '.join(known) or 'none'})"
            )
        return load_reference(str(self.reference_path(name_or_path)))

    # -- calibrations --------------------------------------------------------
    def calibration_dir(self, name: str, version: str | None = None) -> pathlib.Path:
        return _version_dir(self.calibrations_dir, "calibration", name, version, "fit it with `muse calib fit`")

    def next_calibration_version(self, name: str) -> str:
        numeric = [int(v) for v in _versions(self.calibrations_dir / name) if v.isdigit()]
        return str(max(numeric, default=0) + 1)

    def load_calibration(self, ref: str, tenant: str | None = None) -> Calibration:
        name, _, version = ref.partition("/")
        directory = self.calibration_dir(name, version or None)
        path = directory / "tenants" / f"{tenant}.json" if tenant else directory / "calibration.json"
        return read_calibration(path)

    def calibration_tenants(self, ref: str) -> list[str]:
        name, _, version = ref.partition("/")
        directory = self.calibration_dir(name, version or None) / "tenants"
        return sorted(p.stem for p in directory.glob("*.json"))

    def save_calibration(self, cal: Calibration) -> pathlib.Path:
        directory = self.calibrations_dir / cal.name / cal.version
        path = directory / "tenants" / f"{cal.tenant}.json" if cal.tenant else directory / "calibration.json"
        return write_calibration(cal, path)
