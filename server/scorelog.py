"""The score log: sampled (time, tenant, intent, predictor, version, role,
generation, margin, corrected, mapped) records in rotating Parquet files.

Requests are sampled (``sample``: the fraction of requests logged, every row
of each); records collect in memory and go to disk, through Polars, when a
file's worth has gathered, every ``flush_seconds``, and at shutdown.
Each file is written under a temporary name and renamed, so a reader never
sees half a file.  Disk use is bounded: past ``max_bytes`` the oldest files
are deleted.  `muse calib fit --scores DIR --predictor NAME` fits maps from it.

File names sort by time: ``scores-<unix ms>-<pid>-<seq>.parquet``."""
from __future__ import annotations

import logging
import os
import pathlib
import random
import threading
import time

import numpy as np
import polars as pl

log = logging.getLogger("muse.scorelog")

SCHEMA = {
    "time": pl.Datetime("us", "UTC"), "tenant": pl.Utf8, "intent": pl.Utf8, "predictor": pl.Utf8,
    "version": pl.Utf8, "role": pl.Utf8, "generation": pl.Int64, "margin": pl.Float64, "corrected": pl.Float64,
    "mapped": pl.Float64,
}


class ScoreLog:
    def __init__(self, directory: str | pathlib.Path, sample: float = 1.0, rows_per_file: int = 100_000,
                 flush_seconds: float = 10.0, max_bytes: int = 1 << 30):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sample = sample
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.max_bytes = max_bytes
        self._pending: list[tuple] = []
        self._rows = 0
        self._seq = 0
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.written_rows = 0

    def record(self, tenants, intent: str, predictor: str, version: str, role: str, generation: int,
               margins: np.ndarray, corrected: np.ndarray, mapped: np.ndarray) -> None:
        """Queue one request's scores (sampled per request); ``tenants`` is a name or one per row.

        Cheap on purpose -- one append under a lock -- as it runs on the request path;
        the columns are built when the file is written."""
        if self.sample < 1.0 and self._rng.random() >= self.sample:
            return
        with self._lock:
            self._pending.append((time.time(), tenants, intent, predictor, version, role, generation,
                                  margins, corrected, mapped))
            self._rows += len(margins)

    @property
    def due(self) -> bool:
        return self._rows >= self.rows_per_file or (
            self._rows > 0 and time.monotonic() - self._last_flush >= self.flush_seconds)

    def flush(self) -> pathlib.Path | None:
        """Write everything queued as one Parquet file; safe to call from any thread."""
        with self._lock:
            pending, self._pending, self._rows = self._pending, [], 0
            self._last_flush = time.monotonic()
            self._seq += 1
            seq = self._seq
        if not pending:
            return None
        sizes = [len(p[7]) for p in pending]
        def repeat(i):
            return [v for p, n in zip(pending, sizes) for v in [p[i]] * n]
        tenants = [t for p, n in zip(pending, sizes) for t in ([p[1]] * n if isinstance(p[1], str) else p[1])]
        frame = pl.DataFrame({
            "time": (np.repeat([p[0] for p in pending], sizes) * 1e6).astype("datetime64[us]"),
            "tenant": tenants, "intent": repeat(2), "predictor": repeat(3), "version": repeat(4), "role": repeat(5),
            "generation": np.repeat([p[6] for p in pending], sizes).astype(np.int64),
            "margin": np.concatenate([p[7] for p in pending]).astype(np.float64),
            "corrected": np.concatenate([p[8] for p in pending]).astype(np.float64),
            "mapped": np.concatenate([p[9] for p in pending]).astype(np.float64),
        }).cast(SCHEMA)
        name = f"scores-{int(time.time() * 1000):013d}-{os.getpid()}-{seq:06d}.parquet"
        tmp = self.dir / f".{name}.tmp"
        frame.write_parquet(tmp)
        os.replace(tmp, self.dir / name)
        self.written_rows += frame.height
        self._enforce_budget()
        return self.dir / name

    def _enforce_budget(self) -> None:
        files = sorted(self.dir.glob("scores-*.parquet"))
        sizes = [f.stat().st_size for f in files]
        total = sum(sizes)
        for f, size in zip(files, sizes):
            if total <= self.max_bytes:
                break
            f.unlink(missing_ok=True)  # another worker may have removed it first
            total -= size
            log.warning("score log over %d bytes: removed %s", self.max_bytes, f.name)
