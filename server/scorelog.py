"""The score log: sampled (time, tenant, intent, predictor, version, role,
generation, margin, corrected, mapped, request_id, event_id) records in rotating
Parquet files.

``request_id`` is the id the access log shows (server/asgi.py ``Request.id``: the
client's X-Request-ID, else a random one).  ``event_id`` is the client's event id
(an integer as its decimal string) or, where it sent none, the id the server
answered with: ``<prefix>-<row index in the request>``, the prefix being the
request id (on the Open Inference Protocol, the request's ``id`` when given), so
generated ids are unique as long as request ids are.  A shadow row carries the
ids of the active row it copies.  Serving stores per row only a request code and
the row's index, and per request its ids (``EventIds``); the id strings are made
with vectorised Polars calls when a file is written.  Files written before these
two columns existed lack them: muse.calib.samples.read_table reads them beside
newer ones (nulls).

Requests are sampled (``sample``: the fraction of requests logged, every row
of each: serving asks ``sampled()`` per request and ``append``s the rows of
those kept); records collect in preallocated columns and go to disk, through
Polars, when a file's worth (``rows_per_file``) has gathered, every
``flush_seconds``, and at shutdown (``close``).
Each file is encoded in memory, written under a temporary name, fsynced and
renamed, so a reader never sees half a file, even after a power cut.  Disk use
is bounded: past ``max_bytes`` the oldest files are deleted.
`muse calib fit --scores DIR --predictor NAME` fits maps from it.

Writing never fails serving.  When a file cannot be written (disk full, any
OSError) its records stay in memory, at most ``max_pending_rows`` of them (the
oldest are dropped beyond that), and are retried every ``flush_seconds``; one
warning when writing starts failing, one line when it recovers.  What is lost
is counted by reason in ``stats`` (server/metrics.py turns it into
``muse_scorelog_dropped_records_total``).  Temporary files of processes that
died mid-write are removed at start.

The directory's files (durable writes, orphans, the budget): server/scorelog_files.py."""

from __future__ import annotations

import errno
import io
import logging
import operator
import pathlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl

from . import scorelog_files as disk

log = logging.getLogger("muse.scorelog")

# The columns of every score-log file.
SCHEMA = pl.Schema(
    {
        "time": pl.Datetime("us", "UTC"),
        "tenant": pl.Utf8(),
        "intent": pl.Utf8(),
        "predictor": pl.Utf8(),
        "version": pl.Utf8(),
        "role": pl.Utf8(),
        "generation": pl.Int64(),
        "margin": pl.Float64(),
        "corrected": pl.Float64(),
        "mapped": pl.Float64(),
    }
)
# Since issue 16; absent from older files (read_table inserts them as nulls), and null in rows
# appended without ids.
ID_SCHEMA = pl.Schema({"request_id": pl.Utf8(), "event_id": pl.Utf8()})
FILE_SCHEMA = pl.Schema({**SCHEMA, **ID_SCHEMA})  # what this version writes
LABELS = ("tenant", "intent", "predictor", "version", "role")

# A request's ids: (request id, prefix of the event ids generated for it -- None: the request id --,
# the client's event ids in row order -- str, int or None where it sent none -- or None when it
# sent none at all).
EventIds = tuple[str | None, str | None, list[str | int | None] | None]
NO_IDS: EventIds = (None, None, None)  # rows appended without ids: both columns null
_REQUEST_ID, _PREFIX, _CLIENT_IDS = (operator.itemgetter(i) for i in range(3))

# Why records were not written (the `reason` of muse_scorelog_dropped_records_total and
# muse_scorelog_write_failures_total): a fixed set.
DISK_FULL = "disk_full"  # ENOSPC, EDQUOT
IO_ERROR = "io_error"  # any other error writing the file (permissions, EIO, a removed directory...)
ENCODE_ERROR = "encode_error"  # Polars could not encode the records: retrying cannot help, so they are dropped
SHUTDOWN = "shutdown"  # still unwritten when the server stopped
DROP_REASONS = (DISK_FULL, IO_ERROR, ENCODE_ERROR, SHUTDOWN)
FAILURE_REASONS = (DISK_FULL, IO_ERROR, ENCODE_ERROR)
# Records kept in memory while files cannot be written, in files' worth (``rows_per_file``):
# ~140 bytes a row of 1-event requests (52 of columns, the rest the request's ids), so 400,000
# rows take ~55 MB a worker by default -- about a minute of a fully sampled 3,000 req/s worker,
# hours of a typical one, and within a few buffers of what a worker holds anyway.  Clients' own
# event ids add theirs: up to 256 characters each (~110 MB more at that length).
PENDING_FILES = 4


class _Buffer:
    """Preallocated columns; strings are stored as codes into a small table of label tuples,
    and each row's ids as a code into the buffer's list of requests plus the row's index in
    its request (the client's event ids, where given, in a list made on first use).

    Writing a request is a few slice assignments, and turning a full buffer into a
    frame is a handful of vectorised calls whatever the number of requests: an
    earlier design that built the frame from per-request tuples held the GIL for
    ~100 ms per flush at 3,000 req/s, which showed as p99.9 stalls."""

    COLUMNS = ("time", "label", "generation", "margin", "corrected", "mapped", "request", "row")

    def __init__(self, capacity: int):
        self.time = np.empty(capacity, dtype=np.int64)
        self.label = np.empty(capacity, dtype=np.int32)
        self.generation = np.empty(capacity, dtype=np.int64)
        self.margin = np.empty(capacity)
        self.corrected = np.empty(capacity)
        self.mapped = np.empty(capacity)
        self.request = np.empty(capacity, dtype=np.int32)  # index into requests
        self.row = np.empty(capacity, dtype=np.int32)  # the row's index within its request
        self.requests: list[EventIds] = []  # unpacked only when the file is written
        self.event_ids: list[str | int | None] | None = None  # the client's, per row; None until one is given
        self.rows = 0

    @property
    def capacity(self) -> int:
        return self.time.size

    @classmethod
    def join(cls, parts: list[tuple[_Buffer, int]]) -> _Buffer:
        """One buffer, exactly full, of the last ``keep`` rows of each (buffer, keep) in order."""
        if len(parts) == 1 and parts[0][1] == parts[0][0].rows == parts[0][0].capacity:
            return parts[0][0]
        joined = cls(0)
        for column in cls.COLUMNS:
            pieces = [getattr(b, column)[b.rows - keep : b.rows] for b, keep in parts]
            setattr(joined, column, np.concatenate(pieces))
        at, offset = 0, 0
        for b, keep in parts:  # each part's request codes, past the requests of the parts before it
            joined.request[at : at + keep] += offset
            joined.requests += b.requests
            at, offset = at + keep, offset + len(b.requests)
        if any(b.event_ids is not None for b, _ in parts):
            joined.event_ids = []
            for b, keep in parts:
                joined.event_ids += [None] * keep if b.event_ids is None else b.event_ids[b.rows - keep : b.rows]
        joined.rows = joined.capacity
        return joined

    def frame(self, labels: list[tuple]) -> pl.DataFrame:
        n = self.rows
        # only the label tuples this buffer holds: the log's table grows with every tenant seen
        present = np.bincount(self.label[:n], minlength=len(labels))
        used = np.flatnonzero(present)
        remap = np.zeros(len(labels), dtype=np.int64)
        remap[used] = np.arange(len(used))
        codes = pl.Series(remap[self.label[:n]])
        table = {
            name: pl.Series([labels[code][i] for code in used.tolist()], dtype=pl.Utf8) for i, name in enumerate(LABELS)
        }
        requests = pl.Series(self.request[:n])
        request_ids = _utf8(self.requests, _REQUEST_ID)
        if not any(map(_PREFIX, self.requests)):  # /v1's: the request ids (a prefix is never "")
            prefix = request_ids
        else:
            prefix = _utf8(self.requests, _PREFIX).fill_null(request_ids)
        # a null prefix (rows appended without ids) makes a null event id
        event_id = prefix.gather(requests) + "-" + pl.Series(self.row[:n]).cast(pl.Utf8)
        if self.event_ids is not None:
            event_id = _utf8(self.event_ids[:n]).fill_null(event_id)
        return pl.DataFrame(
            {
                "time": pl.Series(self.time[:n]).cast(pl.Datetime("us", "UTC")),
                **{name: values.gather(codes) for name, values in table.items()},
                "generation": self.generation[:n],
                "margin": self.margin[:n],
                "corrected": self.corrected[:n],
                "mapped": self.mapped[:n],
                "request_id": request_ids.gather(requests),
                "event_id": event_id,
            }
        ).cast(FILE_SCHEMA)


# Python objects to a Series a slice at a time: each conversion holds the GIL throughout (~5 ms per
# 100,000 strings, measured), and the event loop of a busy worker waits for it.
_CONVERT_ROWS = 16_384


def _utf8(values: list, field: Callable[[Any], Any] | None = None) -> pl.Series:
    """``values`` (or ``field`` of each) as a Utf8 Series; integers in decimal, None as null."""
    parts = []
    for i in range(0, len(values), _CONVERT_ROWS):
        part = values[i : i + _CONVERT_ROWS]
        if field is not None:
            part = list(map(field, part))
        series = pl.Series(part, dtype=pl.Utf8, strict=False)
        if series.null_count() != part.count(None):  # Polars nulls integers past 128 bits; str() does not
            series = pl.Series([v if v is None or type(v) is str else str(v) for v in part], dtype=pl.Utf8)
        parts.append(series)
    return pl.concat(parts) if parts else pl.Series([], dtype=pl.Utf8)


class ScoreLogStats:
    """What became of the records appended, counted since start: ``written`` to files, ``dropped``
    and files that ``failed`` by reason.  ``take`` hands over what was counted since its last
    call (server/metrics.py adds it to its counters)."""

    def __init__(self) -> None:
        self.written = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.failed = dict.fromkeys(FAILURE_REASONS, 0)
        self._taken = (0, dict(self.dropped), dict(self.failed))
        self._lock = threading.Lock()

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def count(self, written: int = 0, dropped: tuple[str, int] | None = None, failed: str | None = None) -> None:
        with self._lock:
            self.written += written
            if dropped is not None:
                self.dropped[dropped[0]] += dropped[1]
            if failed is not None:
                self.failed[failed] += 1

    def take(self) -> tuple[int, dict[str, int], dict[str, int]]:
        """(records written, {reason: records dropped}, {reason: files failed}) since the last call."""
        with self._lock:
            written, dropped, failed = self.written, dict(self.dropped), dict(self.failed)
            before = self._taken
            self._taken = (written, dropped, failed)
        return (
            written - before[0],
            {r: n - before[1][r] for r, n in dropped.items()},
            {r: n - before[2][r] for r, n in failed.items()},
        )


class _EncodeError(Exception):
    pass


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, _EncodeError):
        return ENCODE_ERROR
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DISK_FULL
    return IO_ERROR


class ScoreLog:
    def __init__(
        self,
        directory: str | pathlib.Path,
        sample: float = 1.0,
        rows_per_file: int = 100_000,
        flush_seconds: float = 10.0,
        max_bytes: int = 1 << 30,
        max_pending_rows: int | None = None,
    ):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sample = sample
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.max_bytes = max_bytes
        # records kept while files cannot be written; beyond this the oldest are dropped
        self.max_pending_rows = PENDING_FILES * rows_per_file if max_pending_rows is None else max_pending_rows
        self.stats = ScoreLogStats()
        self._buffer = _Buffer(rows_per_file)
        self._full: list[_Buffer] = []  # filled buffers waiting for the writer
        self._retry: list[_Buffer] = []  # buffers that could not be written, oldest first (writer only)
        self._appended = 0
        self._labels: list[tuple] = []
        self._codes: dict[tuple, int] = {}
        self._seq = 0
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._rng = random.Random()
        # the failure episode under way: (reason, monotonic start, records dropped before it)
        self._failing: tuple[str, float, int] | None = None
        self._budget_failing = False
        disk.remove_orphans(self.dir)

    def sampled(self) -> bool:
        """Whether to keep a request's scores (decided per request)."""
        return self.sample >= 1.0 or self._rng.random() < self.sample

    def append(
        self,
        tenant: str,
        intent: str,
        predictor: str,
        version: str,
        role: str,
        generation: int,
        margins: np.ndarray,
        corrected: np.ndarray,
        mapped: np.ndarray,
        at_us: np.ndarray,
        requests: Sequence[EventIds] = (NO_IDS,),
        sizes: Sequence[int] | None = None,
    ) -> None:
        """Store rows (already sampled) scored at ``at_us`` (microseconds since the epoch): the
        rows of ``requests[i]``, whose ids they carry, are the next ``sizes[i]`` (at least one;
        default: one request of every row).  Thread-safe."""
        key = (tenant, intent, predictor, version, role)
        n = len(margins)
        if n == 0:
            return
        if sizes is None:
            sizes = (n,)
        k = len(sizes)
        if k == n:  # a row per request (the usual batch-1 traffic)
            of_row = np.arange(n, dtype=np.int32)  # each row's request
            row_in_request = np.zeros(n, dtype=np.int32)
        else:
            counts = np.fromiter(sizes, np.int64, k)
            of_row = np.repeat(np.arange(k, dtype=np.int32), counts)
            firsts = np.repeat((np.cumsum(counts) - counts).astype(np.int32), counts)
            row_in_request = np.arange(n, dtype=np.int32) - firsts
        event_ids: list[str | int | None] | None = None
        if any(map(_CLIENT_IDS, requests)):  # (no Python code per request: the usual case has none)
            event_ids = []
            for (_, _, ids), count in zip(requests, sizes):
                event_ids += [None] * count if ids is None else ids
        with self._lock:
            code = self._codes.get(key)
            if code is None:
                code = self._codes[key] = len(self._labels)
                self._labels.append(key)
            self._appended += n
            start = 0
            while start < n:
                b = self._buffer
                take = min(n - start, b.capacity - b.rows)
                rows = slice(b.rows, b.rows + take)
                part = slice(start, start + take)
                b.time[rows] = at_us[part]
                b.label[rows] = code
                b.generation[rows] = generation
                b.margin[rows] = margins[part]
                b.corrected[rows] = corrected[part]
                b.mapped[rows] = mapped[part]
                # the requests of these rows join the buffer's list (one split across buffers joins both)
                first, last = int(of_row[start]), int(of_row[start + take - 1])
                b.request[rows] = of_row[part] + (len(b.requests) - first)
                b.row[rows] = row_in_request[part]
                b.requests += requests[first : last + 1]
                if event_ids is not None:
                    if b.event_ids is None:
                        b.event_ids = [None] * b.capacity
                    b.event_ids[rows] = event_ids[part]
                b.rows += take
                start += take
                if b.rows == b.capacity:
                    self._full.append(b)
                    self._buffer = _Buffer(self.rows_per_file)

    def warm(self) -> None:
        """Build and encode a two-row file in memory: Polars' first frame and Parquet write page in
        its code, which held the GIL in pieces of up to 5 ms (~30 ms in all, measured against a
        busy thread) -- a pause on the event loop at the first flush, unless done at start-up."""
        b = _Buffer(2)
        b.time[:] = b.label[:] = b.generation[:] = b.request[:] = b.row[:] = 0
        b.margin[:] = b.corrected[:] = b.mapped[:] = 0.0
        b.requests, b.event_ids = [("", "", None)], [None, "id"]  # generated ids and the client's
        b.rows = 2
        b.frame([("",) * len(LABELS)]).write_parquet(io.BytesIO())

    @property
    def pending(self) -> int:
        """Records appended and not yet written or dropped."""
        return self._appended - self.stats.written - self.stats.dropped_total

    @property
    def failing(self) -> str | None:
        """Why files cannot be written now (a reason of FAILURE_REASONS), or None."""
        return self._failing[0] if self._failing else None

    @property
    def due(self) -> bool:
        waited = time.monotonic() - self._last_flush >= self.flush_seconds
        if self._failing is not None:  # retried every flush_seconds, not at every poll
            return waited
        return bool(self._full) or (self._buffer.rows > 0 and waited)

    def flush(self) -> list[pathlib.Path]:
        """Write what failed before, every filled buffer and the current one, a Parquet file each
        (in order, stopping at the first failure); any thread.  Never raises for a write that
        fails: its records wait for the next flush (see the module's doc)."""
        with self._write_lock:  # file names, the retry list, the disk budget: one writer at a time
            with self._lock:
                buffers = self._retry + self._full + ([self._buffer] if self._buffer.rows else [])
                self._full = []
                if self._buffer.rows:
                    self._buffer = _Buffer(self.rows_per_file)
                self._last_flush = time.monotonic()
                labels = list(self._labels)
            self._retry = []
            written: list[pathlib.Path] = []
            for i, b in enumerate(buffers):
                try:
                    written.append(self._write(b, labels))
                except Exception as exc:
                    reason = failure_reason(exc)
                    self._failed(reason, exc)
                    if reason == ENCODE_ERROR:  # these records, not the disk: go on with the others
                        self.stats.count(dropped=(reason, b.rows))
                        continue
                    self._retry = self._bounded(buffers[i:], reason)
                    break
                self.stats.count(written=b.rows)
            if written:
                self._enforce_budget()
            if self._failing is not None and written and not self._retry:
                self._recovered()
        return written

    def close(self) -> int:
        """The last flush, at shutdown: what cannot be written is dropped, logged and counted
        (reason ``shutdown``).  Returns the number of records lost."""
        self.flush()
        with self._write_lock:
            lost = sum(b.rows for b in self._retry)
            self._retry = []
            if lost:
                self.stats.count(dropped=(SHUTDOWN, lost))
                log.error(
                    "score log: %d records could not be written to %s at shutdown (%s) and are lost",
                    lost,
                    self.dir,
                    self.failing,
                )
        return lost

    def _write(self, b: _Buffer, labels: list[tuple]) -> pathlib.Path:
        try:
            encoded = io.BytesIO()
            b.frame(labels).write_parquet(encoded)
        except Exception as exc:
            raise _EncodeError(f"{type(exc).__name__}: {exc}") from exc
        self._seq += 1
        return disk.write_durably(self.dir, disk.file_name(self._seq), encoded.getbuffer())

    def _bounded(self, buffers: list[_Buffer], reason: str) -> list[_Buffer]:
        """``buffers`` to retry, at most ``max_pending_rows`` rows of them, the newest; partly
        filled buffers joined into ones of up to ``rows_per_file`` rows, exactly sized."""
        excess = sum(b.rows for b in buffers) - self.max_pending_rows
        if excess > 0:
            self.stats.count(dropped=(reason, excess))
        kept: list[_Buffer] = []
        parts: list[tuple[_Buffer, int]] = []
        size = 0
        for b in buffers:
            keep = b.rows - min(b.rows, max(excess, 0))
            excess -= b.rows - keep
            if keep == 0:
                continue
            if parts and size + keep > self.rows_per_file:
                kept.append(_Buffer.join(parts))
                parts, size = [], 0
            parts.append((b, keep))
            size += keep
        if parts:
            kept.append(_Buffer.join(parts))
        return kept

    def _failed(self, reason: str, exc: BaseException) -> None:
        self.stats.count(failed=reason)
        if self._failing is not None:
            self._failing = (reason, *self._failing[1:])
            log.debug("score log: still cannot write to %s: %s", self.dir, exc)
            return
        self._failing = (reason, time.monotonic(), self.stats.dropped_total)
        if reason == ENCODE_ERROR:
            then = "dropping those records (counted in muse_scorelog_dropped_records_total)"
        else:
            then = (
                f"keeping up to {self.max_pending_rows} records in memory and retrying every {self.flush_seconds:g} s, "
                "dropping the oldest beyond that (counted in muse_scorelog_dropped_records_total)"
            )
        log.warning("score log: cannot write to %s (%s: %s); %s", self.dir, reason, exc, then)

    def _recovered(self) -> None:
        assert self._failing is not None
        reason, since, dropped_before = self._failing
        self._failing = None
        log.info(
            "score log: writing to %s again after %.0f s of %s; %d records dropped meanwhile",
            self.dir,
            time.monotonic() - since,
            reason,
            self.stats.dropped_total - dropped_before,
        )

    def _enforce_budget(self) -> None:
        try:
            disk.enforce_budget(self.dir, self.max_bytes)
        except OSError as exc:
            if not self._budget_failing:
                log.warning("score log: cannot keep %s within %d bytes: %s", self.dir, self.max_bytes, exc)
            self._budget_failing = True
        else:
            self._budget_failing = False
