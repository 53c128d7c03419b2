"""Deployment snapshots: a validated, immutable routing state with a generation.

Building a snapshot loads and checks everything it names before anything is
served from it; a deployment with one bad entry is refused as a whole, with
the entry named.  Loaded models live in a ModelPool shared across snapshots,
so predictors (and generations) that use the same model share one copy."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import numpy as np

from muse.calib import CalibrationError, MapTable, QuantileMap, Reference, ReferenceError, identity_map
from muse.calib.names import DEFAULT_TENANT
from muse.compile import ArtifactError, CompiledModel, ModelThread, native_map_table

from .batching import BatchStats, ModelBatcher
from .predictor import IDENTITY, Predictor, ensemble_identity
from .registry import Registry, RegistryError
from .spec import BatchingSpec, DeploymentSpec, PredictorSpec, SpecError


class RouteError(LookupError):
    """No route for a (tenant, intent)."""


class ModelPool:
    """Loaded models and their batchers, keyed by NAME/VERSION, shared across snapshots."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.thread = ModelThread()  # every model's calls: one native thread per process
        self._batchers: dict[str, ModelBatcher] = {}
        self._lock = threading.Lock()
        # Per model key, kept when its batcher is released, so nothing observed is dropped.
        self.stats: dict[str, BatchStats] = {}

    def batcher(self, ref: str, batching: BatchingSpec) -> ModelBatcher:
        """The shared batcher of ``ref``, loading the model on first use.  A new one takes
        ``batching`` now; one already serving keeps its settings until ``configure``, so a
        deployment that is refused later never changes what is live."""
        with self._lock:
            b = self._batchers.get(ref)
            if b is None:
                model = self.registry.load_model(ref)
                b = ModelBatcher(model, self.thread, self.stats.setdefault(ref, BatchStats()))
                _apply(b, batching)
                self._batchers[ref] = b
            return b

    def configure(self, snapshot: Snapshot) -> None:
        """Apply a snapshot's batching settings to the batchers it uses (when it goes live)."""
        used = {ref for p in snapshot.spec.predictors for ref in p.models}
        with self._lock:
            for ref in used & self._batchers.keys():
                _apply(self._batchers[ref], snapshot.spec.batching.get(ref, BatchingSpec()))

    def release_unused(self, keep: set[str]) -> list[str]:
        """Drop models no snapshot in ``keep`` uses; in-flight calls hold their own reference."""
        with self._lock:
            gone = [ref for ref in self._batchers if ref not in keep]
            for ref in gone:
                del self._batchers[ref]
            return gone


def _apply(b: ModelBatcher, c: BatchingSpec) -> None:
    b.configure(c.max_rows, c.max_wait_us, c.max_queue_rows, c.inline_max_us, c.max_call_us)


@dataclass(frozen=True)
class Route:
    tenant: str
    intent: str
    active: Predictor
    shadows: tuple[Predictor, ...]


@dataclass(frozen=True)
class Snapshot:
    generation: int
    spec: DeploymentSpec
    predictors: dict[str, Predictor]
    routes: dict[tuple[str, str], Route]
    table: MapTable
    references: dict[str, Reference]  # intent -> reference, for intents whose reference the registry holds

    @property
    def intents(self) -> set[str]:
        return {intent for _, intent in self.routes}

    @property
    def model_refs(self) -> set[str]:
        return {b.model.key for p in self.predictors.values() for b in p.batchers}

    def route(self, tenant: str, intent: str) -> Route:
        route = self.routes.get((tenant, intent)) or self.routes.get((DEFAULT_TENANT, intent))
        if route is None:
            if intent not in self.intents:
                raise RouteError(f"unknown intent {intent!r} (served: {', '.join(sorted(self.intents))})")
            raise RouteError(f"tenant {tenant!r} has no route for intent {intent!r}")
        return route

    def warm(self) -> None:
        """Run every model and kernel once so no request waits on a first call."""
        for p in self.predictors.values():
            X = np.zeros((64, p.num_feature))
            for b in p.batchers:
                margins = b.model.score(X[:1], p.native_table, IDENTITY).margin
                m = b.model.manifest
                self.table.calibrate(margins, IDENTITY, m.beta, m.margin_kind)  # the kernel ensembles use, apply()
                if not b.seconds_per_row:  # seed the inline-or-thread estimate before real traffic
                    t0 = time.perf_counter()
                    b.model.predict(X, margin=True)
                    b.seconds_per_row = (time.perf_counter() - t0) / len(X)


def build_snapshot(spec: DeploymentSpec, pool: ModelPool, generation: int, source: str = "deployment") -> Snapshot:
    """Load and validate everything ``spec`` names; raise SpecError naming the first bad entry."""
    reg = pool.registry
    tenants_with_quotas: set[str] = set()
    for i, q in enumerate(spec.quotas):
        if q.tenant in tenants_with_quotas:
            raise SpecError(f"{source}: quotas[{i}] ({q.tenant}): a second entry for this tenant")
        tenants_with_quotas.add(q.tenant)
    maps = [identity_map()]  # IDENTITY: uncalibrated predictors serve corrected scores unmapped
    parts: dict[str, tuple[PredictorSpec, tuple[ModelBatcher, ...], tuple[str, ...], dict[str | None, int]]] = {}
    for i, p in enumerate(spec.predictors):
        where = f"{source}: predictors[{i}] ({p.name})"
        if p.name in parts:
            raise SpecError(f"{where}: duplicate predictor name")
        batchers = []
        for ref in p.models:
            try:
                batchers.append(pool.batcher(ref, spec.batching.get(ref, BatchingSpec())))
            except (RegistryError, ArtifactError) as exc:
                raise SpecError(f"{where}: model {ref}: {exc}") from None
            except OSError as exc:  # an unreadable library, out of file descriptors, ...: refused, not a 500
                raise SpecError(f"{where}: model {ref}: cannot be loaded: {exc}") from None
        members: list[CompiledModel] = [b.model for b in batchers]
        names = members[0].manifest.feature_names
        for ref, m in zip(p.models[1:], members[1:]):
            if m.manifest.feature_names != names:
                raise SpecError(
                    f"{where}: ensemble member {ref} has features {m.manifest.feature_names[:4]}..., "
                    f"{p.models[0]} has {names[:4]}...; members must share features and order"
                )
        if len(members) > 1 and p.combine == "mean_logit" and any(m.manifest.margin_kind != "logit" for m in members):
            raise SpecError(
                f"{where}: combine = 'mean_logit' needs members whose margins are logits; use 'mean_probability'"
            )
        tenant_maps: dict[str | None, int] = {None: IDENTITY}
        if p.calibration:
            tenant_maps = _load_maps(reg, p, members, maps, where)
        parts[p.name] = (p, tuple(batchers), tuple(names), tenant_maps)
    table = MapTable(maps)
    native = native_map_table(table)
    predictors = {
        name: Predictor(
            p.name, p.version, p.intent, batchers, p.combine, names, table, native, tenant_maps, p.calibration
        )
        for name, (p, batchers, names, tenant_maps) in parts.items()
    }
    routes: dict[tuple[str, str], Route] = {}
    for i, r in enumerate(spec.routes):
        where = f"{source}: routes[{i}] (tenant {r.tenant!r}, intent {r.intent!r})"
        if (r.tenant, r.intent) in routes:
            raise SpecError(f"{where}: duplicate route")
        chosen = []
        for role, name in [("active", r.active)] + [("shadow", s) for s in r.shadows]:
            if name not in predictors:
                raise SpecError(f"{where}: {role} predictor {name!r} is not defined")
            if predictors[name].intent != r.intent:
                raise SpecError(f"{where}: {role} predictor {name!r} serves intent {predictors[name].intent!r}")
            chosen.append(predictors[name])
        if r.active in r.shadows:
            raise SpecError(f"{where}: predictor {r.active!r} is both active and shadow")
        routes[(r.tenant, r.intent)] = Route(r.tenant, r.intent, chosen[0], tuple(chosen[1:]))
    references: dict[str, Reference] = {}
    for intent in {p.intent for p in spec.predictors}:
        # only calibrated predictors need one, and _load_maps has checked those
        with contextlib.suppress(RegistryError, ReferenceError, OSError):
            references[intent] = reg.load_reference(intent).reference
    return Snapshot(generation, spec, predictors, routes, table, references)


def _load_maps(
    reg: Registry, p: PredictorSpec, members: list[CompiledModel], maps: list[QuantileMap], where: str
) -> dict[str | None, int]:
    calibration = p.calibration
    assert calibration is not None  # build_snapshot loads maps only for calibrated predictors
    try:
        reference = reg.load_reference(p.intent)
    except (RegistryError, ReferenceError) as exc:
        raise SpecError(f"{where}: unknown reference for intent {p.intent!r}: {exc}") from None
    except OSError as exc:
        raise SpecError(f"{where}: reference for intent {p.intent!r} cannot be read: {exc}") from None
    if len(members) == 1:
        m = members[0].manifest
        expected = (m.name, m.version, m.library_sha256)
        label = f"model {m.name}/{m.version}"
        beta = m.beta  # the map was fitted on scores corrected with the model's beta
    else:
        ident = ensemble_identity(p.name, p.version, [m.manifest for m in members], p.combine)
        expected = (ident.name, ident.version, ident.sha256)
        label = f"ensemble {p.name}/{p.version}"
        beta = 1.0  # members are corrected one by one before they combine
    tenant_maps: dict[str | None, int] = {}
    try:
        tenants = [None, *reg.calibration_tenants(calibration)]
        for tenant in tenants:
            cal = reg.load_calibration(calibration, tenant=tenant)
            got = (cal.model.name, cal.model.version, cal.model.sha256)
            if got != expected:
                raise SpecError(
                    f"{where}: calibration {p.calibration} was fitted for model "
                    f"{cal.model.name}/{cal.model.version} (sha256 {cal.model.sha256[:12]}), "
                    f"not for {label}; refit it with `muse calib fit`"
                )
            if cal.beta != beta:
                raise SpecError(
                    f"{where}: calibration {p.calibration} was fitted on scores corrected with beta {cal.beta:g}, "
                    f"{label} serves them corrected with beta {beta:g}; refit it with `muse calib fit`"
                )
            if cal.reference_name != reference.name or cal.reference != reference.reference:
                raise SpecError(
                    f"{where}: calibration {p.calibration} maps onto reference {cal.reference_name!r} "
                    f"as it was when fitted, not onto the current {reference.name!r}; refit it"
                )
            tenant_maps[tenant] = len(maps)
            maps.append(cal.quantile_map())
    except (RegistryError, CalibrationError) as exc:
        raise SpecError(f"{where}: calibration {p.calibration}: {exc}") from None
    except OSError as exc:
        raise SpecError(f"{where}: calibration {p.calibration} cannot be read: {exc}") from None
    return tenant_maps
