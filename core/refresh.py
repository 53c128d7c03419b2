"""Calibration refresh: refit a predictor's map from its own recent score-log rows, check the
new map, and publish it as a calibration version and a deployment generation.

`muse calib refresh` runs one refresh; `muse refresher` runs the deployment's ``[[refresh]]``
policies (core.spec.RefreshSpec) when they are due.  Serving processes never fit.

1. **Window.** The predictor's rows of its deployed version -- active and shadow, every
   generation -- of the last ``window`` of time, or its ``last`` N rows.  Their ``corrected``
   scores do not depend on any map, so rows served under older maps count as well.
2. **Fit.** The all-traffic map, and with ``by = "tenant"`` one map per tenant, onto the
   intent's reference (muse.calib: the same fit as `muse calib fit`).
3. **Guardrails**, for each map, on the newest NEWEST_FRACTION of the window's rows (what
   traffic looks like now):
   - enough rows (``min_samples``) and no ties that leave an edge unreachable (the fit's own check);
   - *tolerance*: the new map's alert rate at every edge is within ``tolerance`` of the target
     (plus three binomial standard errors of the slice): a window whose newest rows already
     disagree with it mixes two regimes, and its map would be wrong on arrival;
   - *max_shift*: at no edge does the alert rate move by more than ``max_shift`` of the target
     (plus the same noise) between the live map and the new one: a jump that large is a broken
     feed or an attack more often than drift, and is left to a person (`muse calib fit`).
   A refused all-traffic map refuses the refresh; a refused tenant map keeps that tenant's
   previous map (or, if it had none, the tenant uses the all-traffic map).
4. **Publish**, under the registry's refresh lock (core/locks.py; so two refreshers never publish at once):
   the calibration version whole (Registry.publish_calibration), then a generation derived from
   the current one that changes only this predictor's calibration, published with compare and
   swap (DeploymentStore.publish ``after``).  When another generation was published meanwhile,
   the change is derived again from it (the predictor must still run the same models), up to
   PUBLISH_TRIES times; a calibration version left by a lost race is unused, never wrong.
5. **Audit.** Every refresh that is not a dry run appends a record, published, refused or failed,
   to ``REGISTRY/audit/`` (core/audit.py): who, when, why, the window and each map's alert rates
   before and after.

Steps 2 and 3 are core/refresh_plan.py, pure functions of rows (what the study runs)."""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np
import polars as pl

from muse.calib import Calibration, SampleError, identity_map
from muse.calib.artifact import carried_over, make_calibration
from muse.calib.names import is_tenant
from muse.calib.samples import query_score_log

from .audit import AuditRecord, EdgeRecord, MapRecord, who, write_audit
from .deploy import DeploymentStore, GenerationConflict
from .fit_target import predictor_target
from .refresh_plan import LiveMaps, MapCheck, RefreshPlan, drifted_edges, plan_refresh
from .registry import Registry, RegistryError
from .spec import DeploymentSpec, PredictorSpec, RefreshSpec, SpecError, parse_duration

PUBLISH_TRIES = 3
EMPTY = pl.Schema(
    {"time": pl.Datetime("us", "UTC"), "tenant": pl.String(), "corrected": pl.Float64(), "mapped": pl.Float64()}
)


class RefreshError(ValueError):
    """A refresh that cannot even be planned (nothing deployed, the predictor unknown...)."""


# -- the registry side: rows from the score log, the live maps, publishing, audit, the lock --


def _scan(directory: pathlib.Path | str, query: Callable[[pl.LazyFrame], pl.LazyFrame]) -> pl.DataFrame:
    """``query`` over the score log (empty when it has no files yet)."""
    try:
        frame = query_score_log(directory, query)
    except SampleError as exc:
        raise RefreshError(str(exc)) from None
    return pl.DataFrame(schema=EMPTY) if frame is None else frame


def window_rows(
    directory: pathlib.Path | str,
    predictor: PredictorSpec,
    policy: RefreshSpec,
    now: datetime.datetime,
    generations: list[int] | None = None,
    column: str = "corrected",
) -> pl.DataFrame:
    """(time, tenant, ``column``) of ``predictor``'s rows in the policy's window as of ``now``:
    its deployed version, served by ``generations`` (those that ran it with its models)."""
    window = policy.window_text

    def query(scan: pl.LazyFrame) -> pl.LazyFrame:
        rows = scan.filter(
            (pl.col("predictor") == predictor.name)
            & (pl.col("version") == predictor.version)
            & (pl.col("time") <= now)
            & pl.col(column).is_not_nan()
        )
        if generations is not None:
            rows = rows.filter(pl.col("generation").is_in(generations))
        if window is not None:
            rows = rows.filter(pl.col("time") > now - parse_duration("window", window))
        else:
            assert policy.last is not None
            rows = rows.sort("time").tail(policy.last)
        return rows.select("time", "tenant", column)

    return _scan(directory, query)


def same_models(store: DeploymentStore, predictor: PredictorSpec) -> list[int]:
    """The generations that ran ``predictor`` (its name and version) with its models: a version
    whose models changed under it scored with other models, and its rows are no sample of these."""
    found = []
    for g in store.generations():
        try:
            spec = store.read(g)
        except SpecError:  # a file that never validated is no generation anyone served
            continue
        if any(
            (p.name, p.version, p.models) == (predictor.name, predictor.version, predictor.models)
            for p in spec.predictors
        ):
            found.append(g)
    return found


def live_maps(reg: Registry, predictor: PredictorSpec) -> LiveMaps:
    if predictor.calibration is None:
        return LiveMaps(identity_map())
    cal = reg.load_calibration(predictor.calibration)
    ref = predictor.calibration
    tenants = {t: reg.load_calibration(ref, t) for t in reg.calibration_tenants(ref)}
    return LiveMaps(cal.quantile_map(), {t: c.quantile_map() for t, c in tenants.items()}, cal, tenants)


def calibration_age(live: LiveMaps, now: datetime.datetime) -> datetime.timedelta | None:
    """How old the predictor's all-traffic map is (None: it has none, or no creation time)."""
    if live.calibration is None or not live.calibration.created_at:
        return None
    return now - datetime.datetime.fromisoformat(live.calibration.created_at)


def _map_record(check: MapCheck, outcome: str) -> MapRecord:
    edges = [EdgeRecord(e.edge, e.target, e.live, e.new) for e in check.edges]
    return MapRecord(check.tenant, check.rows, check.newest, outcome, edges, list(check.problems))


@dataclass
class RefreshOutcome:
    plan: RefreshPlan
    outcome: str  # "published", "refused", "dry run"
    generation: int | None = None
    calibration: str | None = None
    maps: list[MapRecord] = field(default_factory=list)
    audit: pathlib.Path | None = None


def _find(spec: DeploymentSpec, name: str, generation: int) -> PredictorSpec:
    found = spec.predictor(name)
    if found is not None:
        return found
    defined = ", ".join(sorted(p.name for p in spec.predictors))
    raise RefreshError(f"predictor {name!r} is not in the current deployment (generation {generation}; has {defined})")


def _calibrations(
    reg: Registry, predictor: PredictorSpec, plan: RefreshPlan, live: LiveMaps, reference_name: str, by_tenant: bool
) -> tuple[list[Calibration], list[MapRecord]]:
    """The new version's maps (all-traffic first) and what became of each map."""
    target = predictor_target(reg, predictor)
    name = live.calibration.name if live.calibration is not None else predictor.name
    version = reg.next_calibration_version(name)
    window = (str(plan.start) if plan.start else None, str(plan.end) if plan.end else None)
    assert plan.overall.qmap is not None
    common = dict(
        name=name,
        version=version,
        model=target.identity,
        reference_name=reference_name,
        reference=reg.load_reference(reference_name).reference,
        beta=target.beta,
        window=window,
    )
    cals = [make_calibration(plan.overall.qmap, sample_size=plan.overall.rows, **common)]  # type: ignore[arg-type]
    records = [_map_record(plan.overall, "fitted")]
    refitted = set()
    for check in plan.tenants:
        if check.ok:
            assert check.qmap is not None
            cals.append(make_calibration(check.qmap, sample_size=check.rows, tenant=check.tenant, **common))  # type: ignore[arg-type]
            refitted.add(check.tenant)
            records.append(_map_record(check, "fitted"))
    judged = {c.tenant: c for c in plan.tenants}
    for tenant, cal in sorted(live.tenant_calibrations.items()):
        if tenant in refitted:
            continue
        check = judged.get(tenant, MapCheck(tenant, 0, problems=["no rows in the window"]))
        same = (cal.model, cal.beta, cal.reference_name, cal.reference) == (
            common["model"],
            common["beta"],
            common["reference_name"],
            common["reference"],
        )
        if not by_tenant:
            check.problems.append(
                'the policy fits no tenant maps (by = "tenant"): the tenant takes the new all-traffic map'
            )
            records.append(_map_record(check, "dropped"))
        elif not same:
            check.problems.append(
                "its map was fitted for another model or reference: the tenant takes the new all-traffic map"
            )
            records.append(_map_record(check, "dropped"))
        else:  # refused, or no rows in the window: its map stays
            cals.append(carried_over(cal, name=name, version=version))
            records.append(_map_record(check, "kept previous"))
    for check in plan.tenants:
        if not check.ok and check.tenant not in live.tenant_calibrations:
            records.append(_map_record(check, "uses all-traffic map"))
    return cals, records


def _switch(spec: DeploymentSpec, predictor: PredictorSpec, calibration: str, description: str) -> DeploymentSpec:
    predictors = [msgspec.structs.replace(p, calibration=calibration) if p == predictor else p for p in spec.predictors]
    return msgspec.structs.replace(spec, predictors=predictors, description=description)


def refresh(
    reg: Registry,
    name: str,
    policy: RefreshSpec,
    *,
    scores: pathlib.Path | str | None = None,
    now: datetime.datetime | None = None,
    trigger: str = "manual",
    dry_run: bool = False,
) -> RefreshOutcome:
    """Refresh predictor ``name``'s calibration by ``policy`` (call under refresh_lock)."""
    store = DeploymentStore(reg)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    base = store.current_generation()
    if base is None:
        raise RefreshError(f"{store.current_path}: nothing is deployed yet; `muse deploy apply FILE` first")
    predictor = _find(store.read(base), name, base)
    reference = reg.load_reference(predictor.intent)
    live = live_maps(reg, predictor)
    rows = window_rows(scores or reg.score_log, predictor, policy, now, same_models(store, predictor))
    plan = plan_refresh(name, rows, reference.reference, live, policy)
    result = RefreshOutcome(plan, "dry run" if dry_run else "refused")
    record = AuditRecord(
        "refresh",
        "refused",
        name,
        who(),
        trigger,
        now.isoformat(timespec="seconds"),
        msgspec.to_builtins(policy),
        str(plan.start) if plan.start else None,
        str(plan.end) if plan.end else None,
        plan.rows,
        base,
        [_map_record(plan.overall, "refused")],
        small_tenants=plan.small_tenants,
        reasons=list(plan.overall.problems),
    )
    if not plan.ok:
        result.maps = record.maps
        if not dry_run:
            result.audit = write_audit(reg, record)
        return result
    cals, result.maps = _calibrations(reg, predictor, plan, live, reference.name, policy.by == "tenant")
    record = msgspec.structs.replace(record, maps=result.maps)
    if dry_run:
        return result
    ref = f"{cals[0].name}/{cals[0].version}"
    try:
        reg.publish_calibration(cals)
        result.generation = _publish(
            store, base, predictor, ref, f"refresh {name}: calibration {ref} from {plan.rows} rows ({trigger})"
        )
    except (SpecError, RegistryError, OSError, ValueError) as exc:  # audited, then told
        record = msgspec.structs.replace(record, outcome="failed", calibration=ref, reasons=[str(exc)])
        write_audit(reg, record)
        raise
    result.outcome, result.calibration = "published", ref
    record = msgspec.structs.replace(
        record, outcome="published", generation=result.generation, calibration=ref, reasons=[]
    )
    result.audit = write_audit(reg, record)
    return result


def _publish(store: DeploymentStore, base: int, predictor: PredictorSpec, ref: str, description: str) -> int:
    """Switch ``predictor`` to calibration ``ref`` in a generation derived from the current one,
    published only as its successor; when another generation came first, derived again from it
    -- provided it still runs the predictor as it was when the map was fitted."""
    generation = base
    for attempt in range(PUBLISH_TRIES):
        current = store.read(generation)
        now_running = _find(current, predictor.name, generation)
        if now_running != predictor:
            raise RefreshError(
                f"generation {generation} changed predictor {predictor.name} (models {now_running.models}, version "
                f"{now_running.version}, calibration {now_running.calibration}) while its map was fitted from "
                f"generation {base}; calibration {ref} is unused, refresh again"
            )
        try:
            switched = _switch(current, now_running, ref, f"{description} on generation {generation}")
            return store.apply(switched, description, after=generation)
        except GenerationConflict:
            if attempt == PUBLISH_TRIES - 1:
                raise
            generation = store.current_generation() or generation
    raise AssertionError("unreachable")


def due(
    reg: Registry,
    policy: RefreshSpec,
    predictor: PredictorSpec,
    generation: int,
    now: datetime.datetime,
    scores: pathlib.Path | str | None = None,
) -> str | None:
    """Why ``policy`` should run now ("schedule" or "drift: ..."), or None."""
    live = live_maps(reg, predictor)
    age = calibration_age(live, now)
    if age is None or age >= parse_duration("every", policy.every):
        return "schedule"
    # the live map's rows of the policy's window (not the generation's whole life: recent drift shows)
    rows = window_rows(scores or reg.score_log, predictor, policy, now, [generation], column="mapped")
    if rows.height < policy.min_samples:
        return None
    reference = reg.load_reference(predictor.intent).reference
    off = drifted_edges(rows["mapped"].cast(pl.Float64).to_numpy(), reference, policy.tolerance)
    if off:
        return f"drift: {'; '.join(off)}"
    if policy.by == "tenant":  # tenants' maps drift apart: pooled, one's excess can hide another's lack
        grouped = rows.group_by(pl.col("tenant").cast(pl.String)).agg(pl.col("mapped")).sort("tenant")
        for tenant, mapped in zip(grouped["tenant"].to_list(), grouped["mapped"].to_list()):
            if len(mapped) >= policy.min_samples and is_tenant(tenant):
                off = drifted_edges(np.asarray(mapped, dtype=np.float64), reference, policy.tolerance)
                if off:
                    return f"drift: tenant {tenant}: {'; '.join(off)}"
    return None
