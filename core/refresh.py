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
4. **Publish**, under the registry's refresh lock (so two refreshers never publish at once):
   the calibration version whole (Registry.publish_calibration), then a generation derived from
   the current one that changes only this predictor's calibration, published with compare and
   swap (DeploymentStore.publish ``after``).  When another generation was published meanwhile,
   the change is derived again from it (the predictor must still run the same models), up to
   PUBLISH_TRIES times; a calibration version left by a lost race is unused, never wrong.
5. **Audit.** Every refresh that is not a dry run appends a record, published or refused, to
   ``REGISTRY/audit/``: who, when, why, the window and each map's alert rates before and after."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import getpass
import math
import os
import pathlib
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec
import numpy as np
import polars as pl

from muse.calib import Calibration, QuantileMap, Reference, SampleError, fit_quantile_map, identity_map
from muse.calib.artifact import carried_over, make_calibration
from muse.calib.names import is_tenant
from muse.calib.quantile_map import MAX_EDGE_ERROR, reference_edges
from muse.calib.samples import scan_parquet_files

from .deploy import DeploymentStore, GenerationConflict
from .fit_target import predictor_target
from .registry import Registry, RegistryError
from .spec import DeploymentSpec, PredictorSpec, RefreshSpec, SpecError, parse_duration

NEWEST_FRACTION = 0.2  # the slice of the window the guardrails judge the new map on
NOISE_SIGMAS = 3.0  # binomial standard errors allowed on top of the tolerance
PUBLISH_TRIES = 3
READ_TRIES = 3  # the server deletes its oldest files to keep its budget, maybe while they are read
LOCK_NAME = "refresh.lock"
EMPTY = {"time": pl.Datetime("us", "UTC"), "tenant": pl.String, "corrected": pl.Float64, "mapped": pl.Float64}


class RefreshError(ValueError):
    """A refresh that cannot even be planned (nothing deployed, the predictor unknown...)."""


# -- the plan: pure functions of rows, a reference and the live maps (the study calls these) --


@dataclass(frozen=True)
class EdgeCheck:
    edge: float
    target: float
    live: float  # alert rate on the newest slice under the live map
    new: float  # ... under the new map

    @property
    def shift(self) -> float:
        return abs(self.new - self.live) / self.target


@dataclass
class MapCheck:
    """One map of a refresh: fitted from ``rows`` window rows, judged on the ``newest`` of them."""

    tenant: str | None
    rows: int
    newest: int = 0
    edges: list[EdgeCheck] = field(default_factory=list)
    qmap: QuantileMap | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.qmap is not None and not self.problems


@dataclass
class LiveMaps:
    """The maps a predictor serves now: all-traffic and per tenant (identity when uncalibrated)."""

    overall: QuantileMap
    tenants: dict[str, QuantileMap] = field(default_factory=dict)
    calibration: Calibration | None = None
    tenant_calibrations: dict[str, Calibration] = field(default_factory=dict)

    def of(self, tenant: str | None) -> QuantileMap:
        return self.overall if tenant is None else self.tenants.get(tenant, self.overall)


@dataclass
class RefreshPlan:
    predictor: str
    rows: int
    start: datetime.datetime | None
    end: datetime.datetime | None
    overall: MapCheck
    tenants: list[MapCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.overall.ok


def _newest(times: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The newest NEWEST_FRACTION of ``scores`` by time (at least one row)."""
    n = max(1, math.ceil(scores.size * NEWEST_FRACTION))
    order = np.argsort(times, kind="stable")
    return scores[order[-n:]]


def check_map(
    tenant: str | None,
    times: np.ndarray,
    scores: np.ndarray,
    reference: Reference,
    live: QuantileMap,
    policy: RefreshSpec,
) -> MapCheck:
    """Fit one map from ``scores`` (corrected, at ``times``) and judge it by the guardrails."""
    check = MapCheck(tenant, int(scores.size))
    if scores.size < policy.min_samples:
        check.problems.append(f"{scores.size} rows in the window, fewer than min_samples {policy.min_samples}")
        return check
    try:
        check.qmap = fit_quantile_map(scores, reference, policy.min_samples, max_edge_error=MAX_EDGE_ERROR)
    except SampleError as exc:
        check.problems.append(str(exc))
        return check
    newest = _newest(times, scores)
    check.newest = int(newest.size)
    new_mapped, live_mapped = check.qmap(newest), live(newest)
    for edge, target in reference_edges(reference):
        e = EdgeCheck(edge, target, float(np.mean(live_mapped >= edge)), float(np.mean(new_mapped >= edge)))
        check.edges.append(e)
        noise = NOISE_SIGMAS * math.sqrt(target * (1 - target) / newest.size)
        if abs(e.new - target) > policy.tolerance * target + noise:
            check.problems.append(
                f"edge {edge:g}: the new map alerts on {e.new:.4f} of the newest {newest.size} rows for a target of "
                f"{target:g}, beyond the tolerance {policy.tolerance:g} (the window mixes regimes: shorten it)"
            )
        if abs(e.new - e.live) > policy.max_shift * target + noise:
            check.problems.append(
                f"edge {edge:g}: the alert rate would move from {e.live:.4f} to {e.new:.4f} at once, "
                f"{e.shift:.0%} of the target {target:g}, beyond max_shift {policy.max_shift:g}; "
                "look at the feed, then refit by hand (`muse calib fit`) if the change is real"
            )
    return check


def plan_refresh(
    predictor: str, rows: pl.DataFrame, reference: Reference, live: LiveMaps, policy: RefreshSpec
) -> RefreshPlan:
    """Fit and judge every map of a refresh from window ``rows`` (time, tenant, corrected)."""
    times = rows["time"].cast(pl.Int64).to_numpy() if rows.height else np.zeros(0, dtype=np.int64)
    scores = rows["corrected"].cast(pl.Float64).to_numpy()
    start, end = (rows["time"].min(), rows["time"].max()) if rows.height else (None, None)
    plan = RefreshPlan(
        predictor,
        rows.height,
        start,  # type: ignore[arg-type]
        end,  # type: ignore[arg-type]
        check_map(None, times, scores, reference, live.overall, policy),
    )
    if policy.by == "tenant" and rows.height:
        grouped = (
            rows.with_row_index("i")
            .group_by(pl.col("tenant").cast(pl.String))
            .agg(pl.col("i"))
            .filter(pl.col("tenant").is_not_null())
            .sort("tenant")
        )
        for tenant, index in zip(grouped["tenant"].to_list(), grouped["i"].to_list()):
            if not is_tenant(tenant):  # what clients sent: such rows count only toward the all-traffic map
                continue
            idx = np.asarray(index, dtype=np.int64)
            plan.tenants.append(check_map(tenant, times[idx], scores[idx], reference, live.of(tenant), policy))
    return plan


def drifted_edges(mapped: np.ndarray, reference: Reference, tolerance: float) -> list[str]:
    """The edges whose alert rate over live ``mapped`` scores is off target by more than
    ``tolerance`` of the target (plus the sample's binomial noise), described."""
    off = []
    for edge, target in reference_edges(reference):
        rate = float(np.mean(mapped >= edge))
        allowed = tolerance * target + NOISE_SIGMAS * math.sqrt(target * (1 - target) / mapped.size)
        if abs(rate - target) > allowed:
            off.append(f"edge {edge:g}: {rate:.4f} for a target of {target:g}")
    return off


# -- the registry side: rows from the score log, the live maps, publishing, audit, the lock --


def _log_files(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(directory.glob("*.parquet")) if directory.is_dir() else []


def _scan(directory: pathlib.Path, query: Callable[[pl.LazyFrame], pl.LazyFrame]) -> pl.DataFrame:
    """``query(LazyFrame)`` over the score log, retried when the server deletes a file meanwhile."""
    for attempt in range(READ_TRIES):
        files = _log_files(directory)
        if not files:
            return pl.DataFrame(schema=EMPTY)
        try:
            frame: pl.DataFrame = query(scan_parquet_files(files, directory)).collect()
            return frame
        except FileNotFoundError:  # deleted since listed: list again
            if attempt == READ_TRIES - 1:
                raise RefreshError(f"{directory}: score-log files keep vanishing while read; try again") from None
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise RefreshError(
                f"{directory}: cannot read the score log ({str(exc).splitlines()[0][:300]}); move the unreadable "
                "file out of the directory"
            ) from None
    raise AssertionError("unreachable")


def window_rows(
    directory: pathlib.Path,
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


@contextlib.contextmanager
def refresh_lock(reg: Registry, wait: float | None = None, stop: threading.Event | None = None) -> Iterator[None]:
    """The registry's refresh lock (an flock on REGISTRY/locks/refresh.lock: released by the
    kernel if its holder dies; it needs a local file system, as flock does).  Waits up to
    ``wait`` seconds (None: until ``stop`` is set, or for ever); TimeoutError naming the
    holder's pid when it cannot be had, InterruptedError when ``stop`` is set meanwhile."""
    if not reg.root.is_dir():
        raise RefreshError(f"--registry {reg.root}: no such directory")
    directory = reg.root / "locks"
    directory.mkdir(exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if stop is not None and stop.is_set():
                    raise InterruptedError("stopped while waiting for the registry's refresh lock") from None
                if deadline is not None and time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    raise TimeoutError(
                        f"{path}: another refresh (pid {holder}) holds the registry's refresh lock"
                    ) from None
                time.sleep(0.05)  # flock has no timed wait
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
    generation: int | None = None
    calibration: str | None = None
    reasons: list[str] = []


def _map_record(check: MapCheck, outcome: str) -> MapRecord:
    edges = [EdgeRecord(e.edge, e.target, e.live, e.new) for e in check.edges]
    return MapRecord(check.tenant, check.rows, check.newest, outcome, edges, list(check.problems))


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
    tmp = directory / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(record), indent=1) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path


@dataclass
class RefreshOutcome:
    plan: RefreshPlan
    outcome: str  # "published", "refused", "dry run"
    generation: int | None = None
    calibration: str | None = None
    maps: list[MapRecord] = field(default_factory=list)
    audit: pathlib.Path | None = None


def _find(spec: DeploymentSpec, name: str, generation: int) -> PredictorSpec:
    for p in spec.predictors:
        if p.name == name:
            return p
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
    scores: pathlib.Path | None = None,
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
    rows = window_rows(scores or reg.root / "scorelog", predictor, policy, now, same_models(store, predictor))
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
    scores: pathlib.Path | None = None,
) -> str | None:
    """Why ``policy`` should run now ("schedule" or "drift: ..."), or None."""
    live = live_maps(reg, predictor)
    age = calibration_age(live, now)
    if age is None or age >= parse_duration("every", policy.every):
        return "schedule"
    # the live map's rows of the policy's window (not the generation's whole life: recent drift shows)
    rows = window_rows(scores or reg.root / "scorelog", predictor, policy, now, [generation], column="mapped")
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
