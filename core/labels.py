"""Labels: which scored events turned out to be fraud, imported after the fact.

    REGISTRY/labels/labels-SEQUENCE.parquet    one file per import, never rewritten

Each file holds event_id (Utf8), label (Int8, 0 or 1), label_time (Datetime us UTC, null
when the import gave none) and imported_at (Datetime us UTC, the same for every row of a
file).  SEQUENCE (zero-padded, 1, 2, ...) orders the imports: the last label of an event
wins, a later import over an earlier one and, within a file, a later row over an earlier
one.  A file is written under a temporary name (``.labels-...tmp``, ignored by readers),
fsynced, then linked to its final name, which fails rather than replaces when a concurrent
import took that sequence first (the import then takes the next one).  A temporary file
left by a crash is never read: delete it at leisure.

Event ids are compared as text: the server logs a client's integer id as its decimal
string, and an import converts integer ids the same way.  Imports are validated row by
row (``read_label_file``): refused rows are reported with their line (CSV) or row
(Parquet) and the reason, and the rest are stored."""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import pathlib
import re
from dataclasses import dataclass, field

import polars as pl

from muse.calib.names import MAX_EVENT_ID_CHARS, TENANT_RULE, is_tenant

from .files import fsync_path
from .registry import Registry

SCHEMA = pl.Schema(
    {
        "event_id": pl.Utf8(),
        "tenant": pl.Utf8(),  # null: the label is the event's whichever tenant sent it
        "label": pl.Int8(),
        "label_time": pl.Datetime("us", "UTC"),
        "imported_at": pl.Datetime("us", "UTC"),
    }
)
REQUIRED = ("event_id", "label")
OPTIONAL = ("label_time", "tenant")
COLUMNS_RULE = (
    "columns event_id (text or whole numbers), label (0 or 1), and optionally label_time and tenant (whose event "
    "it is, when tenants' event ids may collide)"
)
KEY = ["tenant", "event_id"]  # what a label names: an event id, of one tenant or of any

# One import is read whole into memory: bounded so a wrong file (a feature dump, a log)
# fails fast with a fix instead of exhausting memory.  Bigger label sets go in several imports.
MAX_FILE_BYTES = 1 << 30
MAX_ROWS = 20_000_000
MAX_SHOWN = 20  # refused rows listed in full; the rest are counted

_FILE = re.compile(r"^labels-(\d{8,})\.parquet$")
# What str.isprintable() refuses: other (control, format, surrogate, private, unassigned) and
# separator characters, except the plain space.
_UNPRINTABLE = r"[\p{C}\p{Z}--[ ]]"
_TIME_FORMATS_AWARE = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z")
_TIME_FORMATS_NAIVE = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f")
_FIX = {
    "CSV": "write it as UTF-8 CSV, a header line first, the same number of fields on every line",
    "Parquet": "write it again as Parquet (is it complete?)",
}
TIME_RULE = "ISO 8601, e.g. 2026-03-01T12:00:00Z; without an offset it is UTC"


class LabelFileError(ValueError):
    """A label file that cannot be imported at all; the message names the file and the fix."""


@dataclass
class LabelFile:
    """A label file read and checked: the rows to store and the rows refused."""

    path: pathlib.Path
    kind: str  # "CSV" or "Parquet"
    rows: int  # rows read
    valid: pl.DataFrame  # event_id, label, label_time: the rows to store, in file order
    refused: list[tuple[str, str]] = field(default_factory=list)  # (line N / row N, reason), the first MAX_SHOWN
    refused_count: int = 0


@dataclass
class ImportResult:
    read: LabelFile
    path: pathlib.Path | None  # the file written, None when nothing was
    events: int  # distinct events among the stored rows
    relabelled: int  # of those, events the store already held a label for
    changed: int  # of those, events whose label is now different


# -- the store ---------------------------------------------------------------------------------


class LabelStore:
    """REGISTRY/labels/: append-only label files (see the module docstring)."""

    def __init__(self, registry: Registry | str | os.PathLike[str]):
        root = registry.root if isinstance(registry, Registry) else pathlib.Path(registry)
        self.directory = root / "labels"

    def files(self) -> list[tuple[int, pathlib.Path]]:
        """(sequence, path) of every complete label file, in sequence order."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            match = _FILE.match(p.name)
            if match:
                found.append((int(match[1]), p))
        return sorted(found)

    def append(self, rows: pl.DataFrame, imported_at: datetime.datetime | None = None) -> pathlib.Path:
        """Store ``rows`` (event_id, label, optional label_time; checked row by row by
        ``read_label_file``) as the next import; complete on disk when this returns."""
        if rows.height == 0:
            raise ValueError("no labels to store")
        if rows["event_id"].null_count() or not rows["label"].is_in([0, 1]).all():
            raise ValueError("labels to store need an event_id and a label of 0 or 1 on every row")
        when = imported_at or datetime.datetime.now(datetime.timezone.utc)
        frame = rows.with_columns(
            (rows["label_time"] if "label_time" in rows.columns else pl.lit(None)).alias("label_time"),
            (rows["tenant"] if "tenant" in rows.columns else pl.lit(None)).alias("tenant"),
            pl.lit(when).alias("imported_at"),
        )
        frame = frame.select(pl.col(name).cast(dtype) for name, dtype in SCHEMA.items())
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".labels-{os.getpid()}-{id(frame):x}.parquet.tmp"
        try:
            frame.write_parquet(tmp)
            fsync_path(tmp)
            path = self._publish(tmp)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the file is in place either way; this makes the name durable
            fsync_path(self.directory)
        return path

    def _publish(self, tmp: pathlib.Path) -> pathlib.Path:
        """Give ``tmp`` the next sequence's name without replacing another import's file."""
        for _ in range(1000):
            files = self.files()
            path = self.directory / f"labels-{(files[-1][0] if files else 0) + 1:08d}.parquet"
            try:
                os.link(tmp, path)  # unlike a rename, fails when a concurrent import took this name
                return path
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                if path.exists():  # no hard links on this file system: a rename, checked first
                    continue
                os.replace(tmp, path)
                return path
        raise OSError(f"{self.directory}: cannot claim a label file name (too many concurrent imports?)")

    def labels(self) -> pl.DataFrame:
        """One row per labelled event (event_id, tenant, label, label_time, imported_at): its last
        label.  Files imported before labels could name a tenant read as naming none."""
        frames = []
        for _, path in self.files():
            try:
                frame = pl.read_parquet(path)
                if "tenant" not in frame.columns:
                    frame = frame.with_columns(tenant=pl.lit(None, pl.Utf8))
                frames.append(frame.select(pl.col(n).cast(t) for n, t in SCHEMA.items()))
            except (pl.exceptions.PolarsError, OSError) as exc:
                raise LabelFileError(
                    f"{path}: cannot read this label file ({_short(exc)}); move it out of {self.directory} "
                    "and import its labels again"
                ) from None
        if not frames:
            return pl.DataFrame(schema=SCHEMA)
        # files in sequence order and rows in file order: the last occurrence is the last label
        return pl.concat(frames).unique(subset=KEY, keep="last", maintain_order=True).sort("event_id", "tenant")


# -- reading and checking an import --------------------------------------------------------------


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _listing(columns: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(c[:64]) for c in columns[:limit])
    return shown + (f" and {len(columns) - limit} more" if len(columns) > limit else "") or "none"


def _read_raw(path: pathlib.Path) -> tuple[str, pl.DataFrame]:
    """The file's event_id, label and (when present) label_time columns, unconverted."""
    if not path.exists():
        raise LabelFileError(f"{path}: no such file; give the path of a .parquet or .csv file of labels")
    if not path.is_file():
        raise LabelFileError(f"{path}: not a file; give the path of a .parquet or .csv file of labels")
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise LabelFileError(
            f"{path}: unknown file type {path.suffix or '(none)'!r}; give a .parquet or .csv file with {COLUMNS_RULE}"
        )
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise LabelFileError(
            f"{path}: {size:,} bytes, over the {MAX_FILE_BYTES:,} an import reads; split it into several "
            "imports (a later import's label wins)"
        )
    kind = "Parquet" if suffix == ".parquet" else "CSV"
    try:
        if kind == "Parquet":
            columns = list(pl.read_parquet_schema(path))
        else:
            # all as text: the checks below are ours (and ids such as 007 keep their zeros)
            columns = pl.read_csv(path, infer_schema=False, n_rows=0).columns
    except pl.exceptions.NoDataError:
        raise LabelFileError(f"{path}: empty; a label file has a header line and {COLUMNS_RULE}") from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise LabelFileError(f"{path}: cannot read as {kind} ({_short(exc)}); {_FIX[kind]}") from None
    for name in REQUIRED + OPTIONAL:
        if f"{name}_duplicated_0" in columns or columns.count(name) > 1:
            raise LabelFileError(f"{path}: column {name!r} appears more than once; keep one")
    missing = [name for name in REQUIRED if name not in columns]
    if missing:
        raise LabelFileError(
            f"{path}: no column{'s' if len(missing) > 1 else ''} {' and '.join(repr(m) for m in missing)} "
            f"(has: {_listing(columns)}); a label file has {COLUMNS_RULE}"
        )
    wanted = [name for name in REQUIRED + OPTIONAL if name in columns]
    try:
        if kind == "Parquet":
            rows = pl.scan_parquet(path).select(pl.len()).collect().item()
            if rows > MAX_ROWS:
                raise LabelFileError(
                    f"{path}: {rows:,} rows, over the {MAX_ROWS:,} an import reads; split it into several imports"
                )
            frame = pl.read_parquet(path, columns=wanted)
        else:
            # one row past the limit is enough to refuse: a file of short rows is not held whole
            frame = pl.read_csv(path, infer_schema=False, columns=wanted, n_rows=MAX_ROWS + 1)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise LabelFileError(f"{path}: cannot read as {kind} ({_short(exc)}); {_FIX[kind]}") from None
    if frame.height > MAX_ROWS:
        raise LabelFileError(
            f"{path}: {frame.height:,} rows, over the {MAX_ROWS:,} an import reads; split it into several imports"
        )
    return kind, frame


def _event_id(path: pathlib.Path, dtype: pl.DataType) -> pl.Expr:
    """event_id as text (whole numbers as decimal strings, as the server logs them)."""
    if dtype == pl.Utf8:
        return pl.col("event_id")
    if dtype.is_integer() or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return pl.col("event_id").cast(pl.Utf8)
    raise LabelFileError(
        f"{path}: column 'event_id' is {dtype}; event ids are text or whole numbers (write the ids the "
        "scoring requests sent, as text)"
    )


def _label(path: pathlib.Path, dtype: pl.DataType) -> pl.Expr:
    """label as Int8, null where it is not 0 or 1 (refused)."""
    if dtype == pl.Boolean:
        return pl.col("label").cast(pl.Int8)
    if dtype.is_numeric():
        number = pl.col("label").cast(pl.Float64)  # 1.0 is 1: a float column is how pandas stores ints with gaps
    elif dtype == pl.Utf8:
        text = pl.col("label").str.strip_chars().str.to_lowercase()
        number = (
            pl.when(text == "true")
            .then(1.0)
            .when(text == "false")
            .then(0.0)
            .otherwise(text.cast(pl.Float64, strict=False))
        )
    else:
        raise LabelFileError(f"{path}: column 'label' is {dtype}; labels are 0 (not fraud) or 1 (fraud), or booleans")
    return pl.when(number.is_in([0.0, 1.0])).then(number).cast(pl.Int8)


def _label_time(path: pathlib.Path, dtype: pl.DataType) -> pl.Expr:
    """label_time as Datetime us UTC; null where absent and where it cannot be read (refused)."""
    column = pl.col("label_time")
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            return column.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
        return column.dt.convert_time_zone("UTC").cast(SCHEMA["label_time"])
    if dtype == pl.Date:
        return column.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype == pl.Utf8:
        text = column.str.strip_chars()
        parsed = [text.str.to_datetime(f, strict=False, time_unit="us", time_zone="UTC") for f in _TIME_FORMATS_AWARE]
        parsed += [
            text.str.to_datetime(f, strict=False, time_unit="us").dt.replace_time_zone("UTC")
            for f in _TIME_FORMATS_NAIVE
        ]
        parsed.append(text.str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))
        return pl.coalesce(parsed).cast(SCHEMA["label_time"])
    raise LabelFileError(f"{path}: column 'label_time' is {dtype}; give date-times or text in {TIME_RULE}")


def _tenant(path: pathlib.Path, raw: pl.DataFrame) -> pl.Expr:
    """The tenant column as names, null where empty or not a tenant name (checked once per
    distinct value: a label file holds few tenants)."""
    text = pl.col("tenant").cast(pl.Utf8).str.strip_chars()
    names = [v for v in raw.select(text.unique()).to_series().drop_nulls().to_list() if v and is_tenant(v)]
    return pl.when(text.is_in(names)).then(text).otherwise(pl.lit(None, pl.Utf8))


def read_label_file(path: str | os.PathLike[str]) -> LabelFile:
    """``path`` (Parquet or CSV) read and checked row by row.

    LabelFileError when the file as a whole cannot be used (missing, unknown type, too big,
    unreadable, a required column missing or of an unusable type).  Refused rows are
    reported as "line N" for CSV (the header is line 1; a quoted field spanning lines
    shifts the count) and "row N" for Parquet (the first row is row 1)."""
    path = pathlib.Path(path)
    kind, raw = _read_raw(path)
    has_time = "label_time" in raw.columns
    no_time = pl.lit(None, SCHEMA["label_time"])
    tenant = _tenant(path, raw) if "tenant" in raw.columns else pl.lit(None, pl.Utf8)
    checked = raw.select(
        _event_id(path, raw.schema["event_id"]).alias("event_id"),
        _label(path, raw.schema["label"]).alias("label"),
        pl.col("label").cast(pl.Utf8).alias("label_text"),  # the value as given, for messages
        (_label_time(path, raw.schema["label_time"]) if has_time else no_time).alias("label_time"),
        (pl.col("label_time").cast(pl.Utf8) if has_time else pl.lit(None, pl.Utf8)).alias("time_text"),
        tenant.alias("tenant"),
        (pl.col("tenant").cast(pl.Utf8) if "tenant" in raw.columns else pl.lit(None, pl.Utf8)).alias("tenant_text"),
    ).with_columns(time_given=pl.col("time_text").str.strip_chars().str.len_bytes().fill_null(0) > 0)
    e = pl.col("event_id")
    reason = (
        pl.when(e.is_null() | (e == ""))
        .then(pl.lit("event_id is missing"))
        .when(e.str.len_chars() > MAX_EVENT_ID_CHARS)
        .then(pl.lit(f"event_id is longer than {MAX_EVENT_ID_CHARS} characters"))
        .when(e.str.contains(_UNPRINTABLE))
        .then(pl.lit("event_id holds an unprintable character (control, format or separator)"))
        .when(pl.col("label_text").is_null() | (pl.col("label_text").str.strip_chars() == ""))
        .then(pl.lit("label is missing; give 0 or 1"))
        .when(pl.col("label").is_null())
        .then(pl.lit("label is not 0 or 1 (or true/false)"))
        .when(pl.col("time_given") & pl.col("label_time").is_null())
        .then(pl.lit(f"label_time is not a date-time ({TIME_RULE})"))
        .when(pl.col("tenant_text").str.strip_chars().str.len_bytes().fill_null(0).gt(0) & pl.col("tenant").is_null())
        .then(pl.lit(f"tenant is not a tenant name ({TENANT_RULE})"))
    )
    checked = checked.with_columns(reason=reason).with_row_index("index")
    bad = checked.filter(pl.col("reason").is_not_null())
    shown = []
    for row in bad.head(MAX_SHOWN).iter_rows(named=True):
        where = f"line {row['index'] + 2}" if kind == "CSV" else f"row {row['index'] + 1}"
        shown.append((where, _with_value(row)))
    valid = checked.filter(pl.col("reason").is_null()).select("event_id", "tenant", "label", "label_time")
    return LabelFile(path, kind, raw.height, valid, shown, bad.height)


def _with_value(row: dict[str, object]) -> str:
    """A refused row's reason and the value at fault, bounded and printable."""
    reason = str(row["reason"])
    if reason.startswith("event_id is missing") or reason.startswith("label is missing"):
        return reason
    if reason.startswith("event_id"):
        value = str(row["event_id"])
    elif reason.startswith("label_time"):
        value = str(row["time_text"])
    else:
        value = str(row["label_text"])
    shown = ascii(value[:40] + ("..." if len(value) > 40 else ""))  # ascii: no control characters reach a terminal
    return f"{reason}: {shown}"


def import_labels(store: LabelStore, path: str | os.PathLike[str]) -> ImportResult:
    """Read and check ``path``, then store its valid rows as the next import (nothing when
    every row is refused)."""
    read = read_label_file(path)
    if read.valid.height == 0:
        return ImportResult(read, None, 0, 0, 0)
    latest = read.valid.unique(subset=KEY, keep="last", maintain_order=True).select(*KEY, "label")
    before = store.labels().select(*KEY, pl.col("label").alias("before"))
    known = latest.join(before, on=KEY, how="inner", nulls_equal=True)
    changed = known.filter(pl.col("label") != pl.col("before")).height
    written = store.append(read.valid)
    return ImportResult(read, written, latest.height, known.height, changed)


# -- labels joined to scores: what `muse calib status --labels` reports ---------------------------


SERIES = ["predictor", "role", "tenant"]  # the score-log columns a status row is judged by


def labelled_events(frame: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """One row per event of each (predictor, role, tenant) series: its last score ('mapped') and
    its label (null when unlabelled).  A retried event, logged twice by one predictor, counts
    once; rows without an event id (older log files) are each an unlabelled event."""
    ids = pl.col("event_id").cast(pl.Utf8) if "event_id" in frame.columns else pl.lit(None, pl.Utf8)
    rows = frame.select(*SERIES, ids.alias("event_id"), "mapped", *(["time"] if "time" in frame.columns else []))
    if "time" in rows.columns:
        rows = rows.sort("time", maintain_order=True)  # stable: rows logged at one instant keep the log's order
    known = rows.filter(pl.col("event_id").is_not_null())
    events = pl.concat(
        [
            known.unique(subset=[*SERIES, "event_id"], keep="last", maintain_order=True),
            rows.filter(pl.col("event_id").is_null()),
        ]
    )
    # a label naming the event's tenant first, else one naming the id alone (`by_id`)
    own = labels.filter(pl.col("tenant").is_not_null()).select(*KEY, pl.col("label").alias("own"))
    any_tenant = labels.filter(pl.col("tenant").is_null()).select("event_id", pl.col("label").alias("any"))
    joined = events.join(own, on=KEY, how="left").join(any_tenant, on="event_id", how="left")
    return joined.with_columns(
        label=pl.coalesce("own", "any"), by_id=pl.col("own").is_null() & pl.col("any").is_not_null()
    ).drop("own", "any")


def label_metrics(events: pl.DataFrame, edges: list[float]) -> pl.DataFrame:
    """Per series: events, labelled, fraud, and per edge i the labelled events alerted on
    (``alerts{i}``: mapped >= edge) and the fraud among them (``caught{i}``)."""
    labelled = pl.col("label").is_not_null()
    fraud = pl.col("label") == 1
    per_edge = []
    for i, edge in enumerate(edges):
        alert = pl.col("mapped") >= edge
        per_edge += [(alert & labelled).sum().alias(f"alerts{i}"), (alert & fraud).sum().alias(f"caught{i}")]
    return (
        events.group_by(SERIES)
        .agg(pl.len().alias("events"), labelled.sum().alias("labelled"), fraud.sum().alias("fraud"), *per_edge)
        .sort(SERIES)
    )


def shared_ids(events: pl.DataFrame) -> int:
    """Event ids labelled by id alone (no tenant in the label) seen under more than one tenant:
    such a label applies to every tenant's event of that id (clients' own ids can collide)."""
    labelled = events.filter(pl.col("by_id") & pl.col("event_id").is_not_null())
    return labelled.group_by("event_id").agg(pl.col("tenant").n_unique().alias("n")).filter(pl.col("n") > 1).height
