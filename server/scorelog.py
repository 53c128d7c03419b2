"""The score log: sampled (time, tenant, intent, predictor, version, role,
generation, margin, corrected, mapped) records in rotating Parquet files.

Requests are sampled (``sample``: the fraction of requests logged, every row
of each: serving asks ``sampled()`` per request and ``append``s the rows of
those kept); records collect in preallocated columns and go to disk, through
Polars, when a file's worth (``rows_per_file``) has gathered, every
``flush_seconds``, and at shutdown.
Each file is written under a temporary name and renamed, so a reader never
sees half a file.  Disk use is bounded: past ``max_bytes`` the oldest files
are deleted.  `muse calib fit --scores DIR --predictor NAME` fits maps from it.

File names sort by time: ``scores-<unix ms>-<pid>-<seq>.parquet``."""

from __future__ import annotations

import io
import logging
import os
import pathlib
import random
import threading
import time

import numpy as np
import polars as pl

log = logging.getLogger("muse.scorelog")

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
LABELS = ("tenant", "intent", "predictor", "version", "role")


class _Buffer:
    """Preallocated columns; strings are stored as codes into a small table of label tuples.

    Writing a request is a few slice assignments, and turning a full buffer into a
    frame is a handful of vectorised calls whatever the number of requests: an
    earlier design that built the frame from per-request tuples held the GIL for
    ~100 ms per flush at 3,000 req/s, which showed as p99.9 stalls."""

    def __init__(self, capacity: int):
        self.time = np.empty(capacity, dtype=np.int64)
        self.label = np.empty(capacity, dtype=np.int32)
        self.generation = np.empty(capacity, dtype=np.int64)
        self.margin = np.empty(capacity)
        self.corrected = np.empty(capacity)
        self.mapped = np.empty(capacity)
        self.rows = 0

    @property
    def capacity(self) -> int:
        return self.time.size

    def frame(self, labels: list[tuple]) -> pl.DataFrame:
        n = self.rows
        codes = pl.Series(self.label[:n])
        table = {name: pl.Series([t[i] for t in labels], dtype=pl.Utf8) for i, name in enumerate(LABELS)}
        return pl.DataFrame(
            {
                "time": pl.Series(self.time[:n]).cast(pl.Datetime("us", "UTC")),
                **{name: values.gather(codes) for name, values in table.items()},
                "generation": self.generation[:n],
                "margin": self.margin[:n],
                "corrected": self.corrected[:n],
                "mapped": self.mapped[:n],
            }
        ).cast(SCHEMA)


class ScoreLog:
    def __init__(
        self,
        directory: str | pathlib.Path,
        sample: float = 1.0,
        rows_per_file: int = 100_000,
        flush_seconds: float = 10.0,
        max_bytes: int = 1 << 30,
    ):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sample = sample
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.max_bytes = max_bytes
        self._buffer = _Buffer(rows_per_file)
        self._full: list[_Buffer] = []  # filled buffers waiting for the writer
        self._labels: list[tuple] = []
        self._codes: dict[tuple, int] = {}
        self._seq = 0
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._rng = random.Random()

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
    ) -> None:
        """Store rows (already sampled) scored at ``at_us`` (microseconds since the epoch).  Thread-safe."""
        key = (tenant, intent, predictor, version, role)
        with self._lock:
            code = self._codes.get(key)
            if code is None:
                code = self._codes[key] = len(self._labels)
                self._labels.append(key)
            start = 0
            while start < len(margins):
                b = self._buffer
                take = min(len(margins) - start, b.capacity - b.rows)
                rows = slice(b.rows, b.rows + take)
                part = slice(start, start + take)
                b.time[rows] = at_us[part]
                b.label[rows] = code
                b.generation[rows] = generation
                b.margin[rows] = margins[part]
                b.corrected[rows] = corrected[part]
                b.mapped[rows] = mapped[part]
                b.rows += take
                start += take
                if b.rows == b.capacity:
                    self._full.append(b)
                    self._buffer = _Buffer(self.rows_per_file)

    def warm(self) -> None:
        """Build and encode a one-row file in memory: Polars' first frame and Parquet write page in
        its code, which held the GIL in pieces of up to 5 ms (~30 ms in all, measured against a
        busy thread) -- a pause on the event loop at the first flush, unless done at start-up."""
        b = _Buffer(1)
        b.time[0] = b.label[0] = b.generation[0] = 0
        b.margin[0] = b.corrected[0] = b.mapped[0] = 0.0
        b.rows = 1
        b.frame([("",) * len(LABELS)]).write_parquet(io.BytesIO())

    @property
    def due(self) -> bool:
        return bool(self._full) or (self._buffer.rows > 0 and time.monotonic() - self._last_flush >= self.flush_seconds)

    def flush(self) -> list[pathlib.Path]:
        """Write every filled buffer and the current one, one Parquet file each; any thread."""
        with self._lock:
            buffers = self._full + ([self._buffer] if self._buffer.rows else [])
            self._full = []
            if self._buffer.rows:
                self._buffer = _Buffer(self.rows_per_file)
            self._last_flush = time.monotonic()
            labels = list(self._labels)
        written = []
        with self._write_lock:  # file names and the disk budget: one writer at a time
            for b in buffers:
                self._seq += 1
                name = f"scores-{int(time.time() * 1000):013d}-{os.getpid()}-{self._seq:06d}.parquet"
                tmp = self.dir / f".{name}.tmp"
                b.frame(labels).write_parquet(tmp)
                os.replace(tmp, self.dir / name)
                written.append(self.dir / name)
            if written:
                self._enforce_budget()
        return written

    def _enforce_budget(self) -> None:
        files, sizes = [], []
        for f in sorted(self.dir.glob("scores-*.parquet")):
            try:
                sizes.append(f.stat().st_size)
                files.append(f)
            except FileNotFoundError:  # another worker's budget pass got there first
                pass
        total = sum(sizes)
        for f, size in zip(files[:-1], sizes):  # the newest file always stays
            if total <= self.max_bytes:
                break
            f.unlink(missing_ok=True)  # another worker may have removed it first
            total -= size
            log.warning("score log over %d bytes: removed %s", self.max_bytes, f.name)
