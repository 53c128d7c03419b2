"""Publishing deployments: numbered, immutable files plus a `current` pointer.

    deployments/1.toml, 2.toml, ...   every deployment ever applied
    deployments/current               the generation to serve (one number)

Applying validates the whole deployment first (every model loaded and its
checksum verified, every calibration matched to its model and reference), then
claims the next generation number with an exclusive create and moves
`current` with an atomic rename.  Servers poll `current` and swap; a file that
does not validate never becomes current."""

from __future__ import annotations

import fcntl
import os
import pathlib

import msgspec

from muse.calib.names import DEFAULT_TENANT

from .registry import Registry
from .remote import PublishConflict
from .snapshot import ModelPool, build_snapshot
from .spec import DeploymentSpec, RouteSpec, SpecError, decode_spec, encode_spec


class GenerationConflict(SpecError):
    """A deployment derived from one generation lost the race to publish the next."""


class DeploymentStore:
    def __init__(self, registry: Registry):
        self.registry = registry
        self.dir = registry.deployments_dir

    @property
    def current_path(self) -> pathlib.Path:
        return self.dir / "current"

    def current_generation(self) -> int | None:
        try:
            text = self.current_path.read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise SpecError(f"{self.current_path}: expected a generation number, found {text[:40]!r}")
        return int(text)

    def path(self, generation: int) -> pathlib.Path:
        return self.dir / f"{generation}.toml"

    def read(self, generation: int) -> DeploymentSpec:
        path = self.path(generation)
        try:
            return decode_spec(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise SpecError(f"{path}: generation {generation} does not exist") from None

    def generations(self) -> list[int]:
        return sorted(int(p.stem) for p in self.dir.glob("*.toml") if p.stem.isdigit())

    def validate(self, spec: DeploymentSpec, source: str = "deployment") -> None:
        """Raise SpecError naming the first bad entry; loads models into a throwaway pool."""
        build_snapshot(spec, ModelPool(self.registry), generation=0, source=source)

    def apply(self, spec: DeploymentSpec, source: str = "deployment", after: int | None = None) -> int:
        """Validate, store as the next generation (``after``: see publish) and make it current;
        returns the generation."""
        self.validate(spec, source)
        return self.publish(spec, after)

    def publish(self, spec: DeploymentSpec, after: int | None = None) -> int:
        """Store ``spec`` as the next generation and make it current.  With ``after``, only if
        generation ``after`` is still current (compare and swap: ``spec`` was derived from it and
        must not undo a generation someone published meanwhile); GenerationConflict otherwise.

        Publishers take turns on an flock of deployments/.publish.lock, and a generation's file
        and the move of `current` happen under it, so `current` never goes back to an older
        generation; a file left by a publisher that died before moving `current` is skipped
        (numbers only grow), never a reason to refuse.  A registry on object storage publishes
        with conditional writes instead (core/remote.py Mirror.publish)."""
        raw = encode_spec(spec)
        if self.registry.mirror is not None:
            try:
                return self.registry.mirror.publish(raw, after)
            except PublishConflict as exc:
                raise GenerationConflict(str(exc)) from None
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".publish.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if after is not None and self.current_generation() != after:
                raise GenerationConflict(
                    f"generation {self.current_generation()} was published after generation {after}, "
                    "from which this deployment was derived"
                )
            generation = max(self.generations(), default=0) + 1
            path = self.path(generation)
            try:
                with open(path, "xb") as f:  # exclusive: a publisher that ignores the lock still cannot share it
                    f.write(raw)
                    f.flush()
                    os.fsync(f.fileno())
                self.point_to(generation)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        finally:
            os.close(fd)  # releases the lock
        return generation

    def point_to(self, generation: int) -> None:
        if not self.path(generation).exists():
            raise SpecError(f"{self.path(generation)}: generation {generation} does not exist")
        tmp = self.dir / f".current.{os.getpid()}"
        tmp.write_text(f"{generation}\n")
        os.replace(tmp, self.current_path)

    def load_file(self, path: str | pathlib.Path) -> DeploymentSpec:
        path = pathlib.Path(path)
        try:
            return decode_spec(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise SpecError(f"{path}: no such deployment file") from None

    # -- promotion and rollback: new generations derived from the current one ----
    def promote(self, predictor: str, tenants: list[str] | None = None) -> int:
        """Make ``predictor`` active on every route of its intent (or only those of ``tenants``).

        It leaves those routes' shadows; the predictor it replaces is dropped from
        the routes but stays defined, so a rollback or a later promote can name it."""
        generation, spec = self._current()
        defined = {p.name: p for p in spec.predictors}
        if predictor not in defined:
            raise SpecError(
                f"generation {generation}: predictor {predictor!r} is not defined "
                f"(defined: {', '.join(sorted(defined))})"
            )
        intent = defined[predictor].intent
        routes, changed = [], []
        for r in spec.routes:
            if r.intent == intent and (tenants is None or r.tenant in tenants) and r.active != predictor:
                r = RouteSpec(r.tenant, r.intent, predictor, [s for s in r.shadows if s != predictor])
                changed.append(r.tenant)
            routes.append(r)
        wanted = set(tenants or [])
        missing = wanted - {r.tenant for r in spec.routes if r.intent == intent}
        if missing:
            raise SpecError(
                f"generation {generation}: no route of intent {intent!r} for tenant(s) "
                f"{', '.join(sorted(missing))}; routes are per tenant or {DEFAULT_TENANT!r}"
            )
        if not changed:
            raise SpecError(f"generation {generation}: {predictor!r} is already active on those routes")
        who = ", ".join(changed)
        new = msgspec.structs.replace(
            spec, routes=routes, description=f"promote {predictor} for {intent} ({who}) from generation {generation}"
        )
        return self.apply(new, source=f"promote {predictor}", after=generation)

    def rollback(self, to: int | None = None) -> int:
        """Publish an earlier generation again (default: the one before the current)."""
        generation, _ = self._current()
        if to is None:
            earlier = [g for g in self.generations() if g < generation]
            if not earlier:
                raise SpecError(f"generation {generation} is the first; there is nothing to roll back to")
            to = earlier[-1]
        if to == generation:
            raise SpecError(f"generation {to} is already current")
        spec = self.read(to)
        new = msgspec.structs.replace(spec, description=f"rollback to generation {to} (from {generation})")
        return self.apply(new, source=str(self.path(to)), after=generation)

    def _current(self) -> tuple[int, DeploymentSpec]:
        generation = self.current_generation()
        if generation is None:
            raise SpecError(f"{self.current_path}: nothing is deployed yet; `muse deploy apply FILE` first")
        return generation, self.read(generation)
