"""Scoring a file offline (`muse score`): every row of a Parquet or CSV file through the
compiled model and calibration the server uses, on --threads cores, in bounded memory.

    --threads N threads, each taking the next chunk and, on that thread: Parquet: reads it
      (whole row groups, up to chunk_rows; Polars with parallel="none", one core)
      --> its features [chunk, F], one C-order matrix: float64, or float32 when every value
      is one --> one native call (GIL released: compile/_library.pyx runs the model and its
      map under `with nogil`) --> a frame of its scores --chunk by chunk, in input order-->
      Polars' streaming Parquet sink, into a temporary file renamed onto the output once
      every row is written

A thread reads, converts and scores its chunk in turn, so the file's work is split across
the threads as the scoring is, and --threads N uses N cores: at 1 thread, 1.07 (measured,
Polars' decoding, the sink and its allocator's thread included).  Per 1M rows x 100 float64
features (bench/offline_scoring.py, 500 trees x 63 leaves): scoring ~6.4 CPU s, reading
~1.4, the matrix ~0.3, writing ~0.2.  CSV: Polars' streaming reader, one thread, hands its
batches to the N threads; it parses on Polars' own threads (a CSV file cannot be cut without
reading it through), so a CSV run uses more than N cores.

Scores are those of ``CompiledModel.score`` / ``Predictor.score`` on the same rows: a row's
score does not depend on the rows beside it, so chunks and threads change nothing.

Memory does not grow with the file.  At most AHEAD x threads chunks are in flight (taken and
not yet written), and only the one a thread works on holds features: Parquet about 2 x
threads x chunk_rows x features x 8 bytes (the chunk as Polars read it and as the matrix it
becomes; 4 bytes a value as float32) plus Polars' decoding buffers.  Measured peak RSS of
`muse score` on 100 features with 2 threads: ~0.6 GiB at --chunk-rows 65,536 and ~1 GiB at
the default 262,144, the same on 1M and 3M rows.  The default chunk shrinks past 4
threads (default_chunk_rows), so the bound grows more slowly than the threads.  CSV:
Polars' read-ahead, which is its own and bounded, and AHEAD x threads batches (measured at
2 threads: ~0.9 GiB, also the same on 1M and 3M rows)."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import os
import pathlib
import queue
import threading
import time
from collections.abc import Callable, Iterator

import msgspec
import numpy as np
import polars as pl
from polars.io.plugins import register_io_source

from muse.calib import MapTable, identity_map
from muse.calib.names import check_tenant
from muse.compile import Scores, native_map_table

from .deploy import DeploymentStore
from .predictor import IDENTITY
from .registry import Registry, RegistryError
from .snapshot import ModelPool, build_snapshot

# A thread's chunk, by input kind: Parquet whole row groups up to this many rows (see
# parquet_spans); CSV a batch of Polars' streaming reader, which reads a few batches ahead.
DEFAULT_CHUNK_ROWS = {"Parquet": 262_144, "CSV": 65_536}
PARQUET_ROWS_IN_FLIGHT = 1_048_576  # past 4 threads, a thread's default chunk is this / threads ...
MIN_PARQUET_CHUNK_ROWS = 65_536  # ... but no smaller
AHEAD = 2  # chunks in flight per thread: the one it scores, one scored and waiting for the writer
SCORE_COLUMNS = ("margin", "corrected", "mapped")
LABEL_COLUMNS = ("predictor", "version")
DEFAULT_ID_COLUMN = "id"
CSV_SCHEMA_ROWS = 10_000  # rows read to infer an id column's type (features are read as Float64)


class InputError(ValueError):
    """An input file that cannot be scored; the message names the file and the fix."""


# -- what scores the rows ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchScorer:
    """A model or predictor ready to score feature matrices from any thread."""

    predictor: str  # the output's `predictor` column: the predictor's name, or the model's
    version: str  # the output's `version` column
    feature_names: tuple[str, ...]  # the model's, in its order
    score: Callable[[np.ndarray], Scores]  # [rows, features] float32/64 C-order -> Scores; thread-safe
    description: str  # what scored, for the summary: model, calibration, which map


def model_scorer(reg: Registry, model: str, calibration: str | None = None, tenant: str | None = None) -> BatchScorer:
    """Model ``model`` (NAME or NAME/VERSION), posterior-corrected by its beta and mapped through
    ``calibration`` (NAME or NAME/VERSION): ``tenant``'s map when it has one of its own, else
    the all-traffic map -- as the server picks.  Without a calibration, mapped = corrected (an
    uncalibrated predictor's scores)."""
    compiled = reg.load_model(model)
    m = compiled.manifest
    maps = [identity_map()]
    index = IDENTITY
    description = f"model {compiled.key}, no calibration (mapped = corrected)"
    if tenant is not None:
        check_tenant(tenant, "--tenant")
        if calibration is None:
            raise ValueError("--tenant picks a tenant's map of a calibration: give --calibration too, or --predictor")
    if calibration is not None:
        own = tenant is not None and tenant in reg.calibration_tenants(calibration)
        cal = reg.load_calibration(calibration, tenant=tenant if own else None)
        if (cal.model.name, cal.model.version, cal.model.sha256) != (m.name, m.version, m.library_sha256):
            raise ValueError(
                f"--calibration {calibration}: fitted for {cal.model.name}/{cal.model.version} "
                f"(sha256 {cal.model.sha256[:12]}), not for model {compiled.key} (sha256 {m.library_sha256[:12]}); "
                "give this model's calibration, or --predictor for an ensemble's"
            )
        maps.append(cal.quantile_map())
        index = 1
        which = f"tenant {tenant}'s map" if own else "all-traffic map"
        if tenant is not None and not own:
            which += f" (no map of {tenant}'s own)"
        description = f"model {compiled.key}, calibration {cal.name}/{cal.version}, {which}"
    native = native_map_table(MapTable(maps))

    def score(X: np.ndarray) -> Scores:
        return compiled.score(X, native, index)

    return BatchScorer(m.name, m.version, tuple(m.feature_names), score, description)


def predictor_scorer(reg: Registry, name: str, tenant: str | None = None) -> BatchScorer:
    """Predictor ``name`` of the current deployment (an ensemble too), built as the server
    builds it (muse.core.snapshot), with ``tenant``'s map (the all-traffic map when the
    tenant has none of its own, or when no tenant is given)."""
    store = DeploymentStore(reg)
    generation = store.current_generation()
    if generation is None:
        raise RegistryError(
            f"{store.current_path}: no deployment is current; apply one with `muse deploy apply`, "
            "or score a model with --model"
        )
    if tenant is not None:
        check_tenant(tenant, "--tenant")
    spec = store.read(generation)
    found = spec.predictor(name)
    if found is None:
        have = ", ".join(p.name for p in spec.predictors)
        raise RegistryError(
            f"--predictor {name}: not in the current deployment ({store.path(generation)}; has: {have})"
        )
    # Only this predictor's models are loaded: no routes, quotas or refresh policies, nothing else to check.
    alone = msgspec.structs.replace(spec, predictors=[found], routes=[], quotas=[], refresh=[])
    snapshot = build_snapshot(alone, ModelPool(reg), generation, source=str(store.path(generation)))
    predictor = snapshot.predictors[name]
    index = predictor.maps[None] if tenant is None else predictor.map_index(tenant)
    if predictor.calibration is None:
        which = "uncalibrated (mapped = corrected)"
    elif tenant is None:
        which = f"calibration {predictor.calibration}, all-traffic map"
    elif tenant in predictor.maps:
        which = f"calibration {predictor.calibration}, tenant {tenant}'s map"
    else:
        which = f"calibration {predictor.calibration}, all-traffic map (no map of {tenant}'s own)"
    models = ", ".join(b.model.key for b in predictor.batchers)
    description = f"predictor {name} version {predictor.version} (generation {generation}; {models}), {which}"

    def score(X: np.ndarray) -> Scores:
        return predictor.score(X, index)

    return BatchScorer(name, predictor.version, predictor.feature_names, score, description)


# -- the input -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """Which columns of a file are the features and the id, and how to stream them."""

    path: pathlib.Path
    frame: pl.LazyFrame  # the id column (if any), then the features as `dtype`, in the model's order
    features: tuple[str, ...]  # the input's feature columns, in the model's order
    id_column: str | None
    by_name: bool  # matched by the model's feature names (else by position)
    id_dtype: pl.DataType | None
    dtype: pl.DataType  # the features' as scored: Float32 when every value is a float32

    @property
    def kind(self) -> str:
        return "CSV" if self.path.suffix.lower() == ".csv" else "Parquet"


def _scan(path: pathlib.Path, schema_overrides: dict[str, pl.DataType] | None = None) -> pl.LazyFrame:
    """The input as Polars scans it.  Parquet: each read on one core (parallel="none"), the
    thread that asks for it: `muse score --threads N` reads on N threads, not on Polars' pool."""
    suffix = path.suffix.lower()
    if path.is_dir():
        return pl.scan_parquet(path / "*.parquet", parallel="none")
    if suffix == ".parquet":
        return pl.scan_parquet(path, parallel="none")
    if suffix == ".csv":
        return pl.scan_csv(path, schema_overrides=schema_overrides, infer_schema_length=CSV_SCHEMA_ROWS)
    raise InputError(f"{path}: unknown file type; --input takes a .parquet or .csv file (or a Parquet directory)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unreadable(path: pathlib.Path, exc: BaseException) -> InputError:
    return InputError(f"{path}: cannot read ({_first_line(exc)})")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numbers_only(csv: pathlib.Path) -> bool:
    """Whether the first line of a CSV file holds numbers (or empty fields) only: a row, not a
    header."""
    first = pl.read_csv(csv, has_header=False, n_rows=1, infer_schema=False).row(0) if csv.stat().st_size else ()
    fields = [f for f in first if f not in (None, "")]
    return bool(fields) and all(isinstance(f, str) and _is_number(f) for f in fields)


def _numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() or dtype == pl.Boolean or dtype == pl.Null


# Types whose every value is a float32: such features are scored as float32 (the native entry
# for float32 rows compares them as the float64 one would their float64 values, so the scores
# are the same), in half the memory and a cheaper conversion.
FLOAT32_EXACT = (pl.Float32, pl.Int8, pl.Int16, pl.UInt8, pl.UInt16, pl.Boolean, pl.Null)


def plan_input(path: str | os.PathLike[str], feature_names: tuple[str, ...], id_column: str | None = None) -> InputPlan:
    """Match ``path``'s columns to the model's features: by name when the file has every one of
    them (other columns are ignored; order does not matter), else by position, when the file
    has exactly as many columns as features besides the id column.  The id column is
    ``id_column``, else ``id`` when the file has one.  InputError naming the file and the fix."""
    path = pathlib.Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    headerless = False
    csv = path.suffix.lower() == ".csv"
    try:
        lazy = _scan(path)
        schema = lazy.collect_schema()
        columns = list(schema.names())
        if csv and _numbers_only(path):
            headerless = True  # the first line is a row of numbers: the file has no header
            lazy = pl.scan_csv(path, has_header=False, infer_schema_length=CSV_SCHEMA_ROWS)
            schema = lazy.collect_schema()
            columns = list(schema.names())
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _unreadable(path, exc) from None
    if id_column is not None and id_column not in columns:
        shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
        raise InputError(f"{path}: no column {id_column!r} for --id-column (columns: {shown})")
    if id_column is None and DEFAULT_ID_COLUMN in columns:
        id_column = DEFAULT_ID_COLUMN
    if id_column in SCORE_COLUMNS + LABEL_COLUMNS:
        raise InputError(
            f"{path}: id column {id_column!r} has the name of an output column; rename it in the file "
            f"(the output adds {', '.join(SCORE_COLUMNS + LABEL_COLUMNS)})"
        )
    present = [f for f in feature_names if f in columns]
    n = len(feature_names)
    if len(present) == n:
        features, by_name = tuple(feature_names), True
    elif present:
        missing = [f for f in feature_names if f not in columns]
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(
            f"{path}: has {len(present)} of the model's {n} feature columns but not {shown}; "
            "name every feature column as the model does (or none, to match by position)"
        )
    else:
        candidates = [c for c in columns if c != id_column]
        if len(candidates) != n:
            besides = f" besides the id column {id_column!r}" if id_column else ""
            first = ", ".join(feature_names[:3])
            raise InputError(
                f"{path}: {len(candidates)} columns{besides} and none named as the model's features "
                f"({first}, ...); give the {n} features by name, or exactly {n} columns in the model's order"
            )
        features, by_name = tuple(candidates), False
    wrong = [(c, schema[c]) for c in features if not _numeric(schema[c])]
    if wrong and not csv:  # a CSV's features are parsed as Float64 below
        c, dtype = wrong[0]
        raise InputError(
            f"{path}: feature column {c!r} is {dtype}, not numeric; features must be numbers (null or NaN: missing)"
        )
    if csv:
        overrides: dict[str, pl.DataType] = {c: pl.Float64() for c in features}
        if id_column is not None:
            overrides[id_column] = schema[id_column]  # as inferred: every chunk gets the same type
        lazy = pl.scan_csv(
            path, has_header=not headerless, schema_overrides=overrides, infer_schema_length=CSV_SCHEMA_ROWS
        )
    dtype = pl.Float32() if not csv and all(schema[c] in FLOAT32_EXACT for c in features) else pl.Float64()
    selected = [pl.col(c).cast(dtype) for c in features]
    if id_column is not None:
        selected.insert(0, pl.col(id_column).alias(f"__id__{id_column}"))
    id_dtype = schema[id_column] if id_column is not None else None
    return InputPlan(path, lazy.select(selected), features, id_column, by_name, id_dtype, dtype)


def count_rows(plan: InputPlan) -> int:
    """The rows of the input: a Parquet file's metadata; a CSV file is read through (once)."""
    try:
        return int(_scan(plan.path).select(pl.len()).collect().item())
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _unreadable(plan.path, exc) from None


# -- scoring -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Summary:
    rows: int
    seconds: float
    chunks: int
    threads: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else math.inf


class _Cancelled(Exception):
    """The caller stopped the run (Ctrl-C); the partial output is removed."""


Progress = Callable[[int, float], None]  # (rows done, seconds since the start)


def default_chunk_rows(kind: str, threads: int) -> int:
    """A thread's chunk: DEFAULT_CHUNK_ROWS of the input's kind, smaller past 4 threads (Parquet:
    down to MIN_PARQUET_CHUNK_ROWS) so that memory grows more slowly than the threads."""
    if kind == "CSV":
        return DEFAULT_CHUNK_ROWS["CSV"]
    return max(MIN_PARQUET_CHUNK_ROWS, min(DEFAULT_CHUNK_ROWS["Parquet"], PARQUET_ROWS_IN_FLIGHT // threads))


def score_file(
    scorer: BatchScorer,
    plan: InputPlan,
    output: str | os.PathLike[str],
    *,
    threads: int,
    chunk_rows: int | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Score every row of ``plan`` with ``scorer`` into the Parquet file ``output``, rows in the
    input's order: the id column (when the input has one), margin, corrected, mapped, predictor,
    version.  ``threads`` threads each take a chunk of at most ``chunk_rows`` rows (default:
    default_chunk_rows) and read, convert and score it (a Parquet chunk: whole row groups, in
    rounds of ``threads`` chunks, see parquet_spans); the chunks are written in order.  The
    output appears whole (written beside it, then renamed) or not at all."""
    if threads < 1:
        raise ValueError(f"--threads {threads}: give 1 or more")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(plan.kind, threads)
    if chunk_rows < 1:
        raise ValueError(f"--chunk-rows {chunk_rows}: give 1 or more")
    output = pathlib.Path(output)
    if output.suffix.lower() != ".parquet":
        raise ValueError(f"--output {output}: scores are written as Parquet; give a file name ending in .parquet")
    if not output.parent.is_dir():
        raise ValueError(f"--output {output}: no directory {output.parent}; create it first")
    if output.resolve() == plan.path.resolve():
        raise ValueError(f"--output {output}: the input file itself; give another file name")
    schema: dict[str, pl.DataType] = {}
    id_name = None
    if plan.id_column is not None:
        assert plan.id_dtype is not None
        id_name = f"__id__{plan.id_column}"
        schema[plan.id_column] = plan.id_dtype
    schema.update({c: pl.Float64() for c in SCORE_COLUMNS})
    spans = parquet_spans(plan, chunk_rows, threads) if plan.kind == "Parquet" else None
    run = _Run(threads, total=None if spans is None else len(spans))
    started = time.perf_counter()
    done = [0, 0]  # rows, chunks written
    failure: list[BaseException] = []  # what stopped the run, as raised (not as Polars wraps it)

    def take() -> tuple[int, pl.Series | None, np.ndarray] | None:
        """The next chunk: its index, ids and features matrix.  Parquet: read on this thread;
        CSV: as the reader handed it.  The frame read is gone once its matrix is made."""
        if spans is None:
            handed = run.queued()
            if handed is None:
                return None
            index, batch = handed
            del handed
        else:
            taken = run.start()
            if taken is None:
                return None
            index, (offset, rows) = taken, spans[taken]
            try:
                batch = plan.frame.slice(offset, rows).collect()
            except (pl.exceptions.PolarsError, OSError) as exc:
                raise _unreadable(plan.path, exc) from None
        if id_name is None or plan.id_column is None:
            return index, None, batch.to_numpy(order="c")
        return index, batch.get_column(id_name).rename(plan.id_column), batch.drop(id_name).to_numpy(order="c")

    def work() -> None:
        try:
            while (chunk := take()) is not None:
                index, ids, X = chunk
                del chunk
                scores = scorer.score(X)
                del X  # before the next chunk is read
                columns: dict[str, pl.Series | np.ndarray] = {} if ids is None else {ids.name: ids}
                columns.update(margin=scores.margin, corrected=scores.corrected, mapped=scores.mapped)
                run.finish(index, pl.DataFrame(columns, schema=schema))
        except BaseException as exc:
            run.fail(exc)

    def read_csv() -> None:
        """Polars' streaming CSV reader, its batches handed to the workers in order."""
        index = 0
        try:
            batches = plan.frame.collect_batches(chunk_size=chunk_rows)
            while run.room():
                batch = next(batches, None)
                if batch is not None and len(batch):
                    run.hand(index, batch)
                    index += 1
                    continue
                run.release()
                if batch is None:
                    run.set_total(index)
                    break
        except (pl.exceptions.PolarsError, OSError) as exc:
            run.fail(_unreadable(plan.path, exc))
        except BaseException as exc:
            run.fail(exc)
        finally:
            run.hand_end()

    def chunks() -> Iterator[pl.DataFrame]:
        """The scored chunks, in order: what the Parquet sink writes."""
        try:
            for frame in run.in_order():
                done[0] += len(frame)
                done[1] += 1
                if progress is not None:
                    progress(done[0], time.perf_counter() - started)
                yield frame
        except BaseException as exc:
            failure.append(exc)
            raise

    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    sink = register_io_source(lambda *_: chunks(), schema=schema)
    labels = [pl.lit(scorer.predictor).alias("predictor"), pl.lit(scorer.version).alias("version")]
    writer_error: list[BaseException] = []

    def write() -> None:
        try:
            sink.with_columns(labels).sink_parquet(temporary)
        except BaseException as exc:
            writer_error.append(exc)

    # Reading, scoring and writing run on threads of their own, so this one stays in Python and
    # Ctrl-C reaches it.  The readers are threads of ours, not Polars' (the sink pulls chunks()
    # on a thread of its own): a read nested in the sink's query buffered the whole file ahead.
    workers = [threading.Thread(target=work, name=f"muse-score-{k}", daemon=True) for k in range(threads)]
    if spans is None:
        workers.append(threading.Thread(target=read_csv, name="muse-score-reader", daemon=True))
    writer = threading.Thread(target=write, name="muse-score-writer", daemon=True)
    try:
        for thread in workers:
            thread.start()
        writer.start()
        while writer.is_alive():
            writer.join(0.1)
        if failure:
            raise failure[0]
        if writer_error:
            exc = writer_error[0]
            if isinstance(exc, (pl.exceptions.PolarsError, OSError)):
                raise OSError(f"--output {output}: cannot write ({_first_line(exc)})") from None
            raise exc
        os.replace(temporary, output)
    except BaseException:
        run.cancel()
        if writer.is_alive():  # stopped by Ctrl-C: the writer's chunks() raises _Cancelled
            writer.join()
        temporary.unlink(missing_ok=True)
        raise
    finally:
        run.cancel()
        for thread in workers:
            thread.join()
    return Summary(done[0], time.perf_counter() - started, done[1], threads)


class _Run:
    """What the threads of a score_file share.  A chunk is in flight from when a worker (or the
    CSV reader) takes it until the writer takes its scores: at most AHEAD x threads chunks, of
    which at most ``threads`` hold features (one a worker); the others are scores waiting for
    an earlier chunk to be written."""

    def __init__(self, threads: int, total: int | None):
        self._room = threading.Semaphore(AHEAD * threads)
        self._lock = threading.Condition()
        self._next = 0  # the next chunk a worker takes (Parquet)
        self._total = total  # chunks in the input, once known (CSV: when the reader is done)
        self._scored: dict[int, pl.DataFrame] = {}
        self._errors: list[BaseException] = []
        self._cancelled = threading.Event()
        self._handed: queue.SimpleQueue[tuple[int, pl.DataFrame] | None] = queue.SimpleQueue()

    def room(self) -> bool:
        """Wait for a place for one more chunk in flight; False when the run is stopping."""
        while not self._room.acquire(timeout=0.1):
            if self._cancelled.is_set():
                return False
        if self._cancelled.is_set():
            self._room.release()
            return False
        return True

    def release(self) -> None:
        self._room.release()

    def start(self) -> int | None:
        """The next chunk's index, once it has room, or None: every chunk taken, or the run stopping."""
        if not self.room():
            return None
        with self._lock:
            index = self._next
            self._next += 1
        assert self._total is not None
        if index >= self._total:
            self._room.release()
            return None
        return index

    def hand(self, index: int, batch: pl.DataFrame) -> None:
        """The CSV reader: a batch for the workers (it holds a place taken with room())."""
        self._handed.put((index, batch))

    def hand_end(self) -> None:
        self._handed.put(None)

    def queued(self) -> tuple[int, pl.DataFrame] | None:
        """A CSV worker: the next batch the reader handed, or None once it has handed them all."""
        while not self._cancelled.is_set():
            try:
                item = self._handed.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                self._handed.put(None)  # for the other workers
            return item
        return None

    def set_total(self, total: int) -> None:
        with self._lock:
            self._total = total
            self._lock.notify_all()

    def finish(self, index: int, scored: pl.DataFrame) -> None:
        with self._lock:
            self._scored[index] = scored
            self._lock.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)
            self._lock.notify_all()
        self._cancelled.set()  # the other threads stop taking chunks

    def cancel(self) -> None:
        self._cancelled.set()

    def in_order(self) -> Iterator[pl.DataFrame]:
        """The scored chunks in the input's order, each as soon as it and those before it are
        scored; raises what stopped a worker, or _Cancelled."""
        index = 0
        while True:
            with self._lock:
                while True:
                    if self._errors:
                        raise self._errors[0]
                    if self._cancelled.is_set():
                        raise _Cancelled
                    if index in self._scored:
                        scored = self._scored.pop(index)
                        break
                    if self._total is not None and index >= self._total:
                        return
                    self._lock.wait(0.1)
            self._room.release()
            yield scored
            index += 1


def parquet_spans(plan: InputPlan, chunk_rows: int, threads: int) -> list[tuple[int, int]]:
    """(offset, rows) of each chunk of a Parquet input: whole row groups, as many as fit in
    balanced_chunk_rows, a row group of more rows cut in equal parts (see chunk_spans).  A
    read of whole row groups decodes nothing twice; one that starts or ends inside a row group
    decodes the pages there twice (measured: ~0.1 CPU s a cut, 100 float64 columns).  When
    the row groups cannot be read from the footers, the file is one row group."""
    total = count_rows(plan)
    groups = _row_groups(plan.path)
    if groups is None or sum(groups) != total:
        groups = [total]
    return chunk_spans(groups, balanced_chunk_rows(total, chunk_rows, threads))


def balanced_chunk_rows(total: int, chunk_rows: int, threads: int) -> int:
    """At most chunk_rows, and few enough that the chunks come in whole rounds of ``threads``:
    no thread idles while another scores the file's last chunk (a file of one chunk, alone)."""
    rounds = max(1, -(-total // (threads * chunk_rows)))
    return max(1, -(-total // (rounds * threads)))


def chunk_spans(row_groups: list[int], chunk_rows: int) -> list[tuple[int, int]]:
    """(offset, rows) of chunks of whole consecutive row groups, each at most chunk_rows or a
    part of a row group of more rows, cut in as few equal parts as fit."""
    spans: list[tuple[int, int]] = []
    start = offset = 0  # the chunk being filled: rows [start, offset)
    for rows in row_groups:
        if offset - start + rows > chunk_rows and offset > start:
            spans.append((start, offset - start))
            start = offset
        if rows > chunk_rows:
            parts = -(-rows // chunk_rows)
            cuts = [offset + rows * k // parts for k in range(parts + 1)]
            spans += [(a, b - a) for a, b in itertools.pairwise(cuts)]
            start = offset + rows
        offset += rows
    if offset > start:
        spans.append((start, offset - start))
    return spans


def _row_groups(path: pathlib.Path) -> list[int] | None:
    """The rows of each row group of a Parquet file (a directory: of its files, in name order,
    as Polars reads them), from the files' footers, read by pyarrow when it is installed
    (Polars does not expose row groups); None without it or when a footer cannot be read (the
    chunks are then cut without regard to row groups: slower, not wrong)."""
    try:
        parquet = importlib.import_module("pyarrow.parquet")
    except ImportError:
        return None
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    groups: list[int] = []
    try:
        for file in files:
            meta = parquet.read_metadata(file)
            groups += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except Exception:  # a footer pyarrow cannot read (encrypted, damaged): Polars says what at the read
        return None
    return groups


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
