"""The score log: sampled (time, tenant, intent, predictor, version, role,
generation, margin, corrected, mapped) records in rotating Parquet files.

Records collect in memory as column arrays and go to disk, through Polars,
when a file's worth has gathered, every ``flush_seconds``, and at shutdown.
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
        self._parts: list[dict] = []
        self._rows = 0
        self._seq = 0
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.written_rows = 0

    def record(self, tenants, intent: str, predictor: str, version: str, role: str, generation: int,
               margins: np.ndarray, corrected: np.ndarray, mapped: np.ndarray) -> None:
        """Log a batch; ``tenants`` is one name for all rows or one per row.  Thread-safe."""
        n = len(margins)
        if self.sample < 1.0:
            keep = np.flatnonzero(np.random.default_rng(self._rng.getrandbits(64)).random(n) < self.sample)
            if keep.size == 0:
                return
            margins, corrected, mapped = margins[keep], corrected[keep], mapped[keep]
            if not isinstance(tenants, str):
                tenants = [tenants[i] for i in keep]
            n = keep.size
        now = int(time.time() * 1e6)
        part = {
            "time": np.full(n, now, dtype="datetime64[us]"), "tenant": [tenants] * n if isinstance(tenants, str)
            else list(tenants), "intent": [intent] * n, "predictor": [predictor] * n, "version": [version] * n,
            "role": [role] * n, "generation": np.full(n, generation, dtype=np.int64),
            "margin": np.asarray(margins, dtype=np.float64), "corrected": np.asarray(corrected, dtype=np.float64),
            "mapped": np.asarray(mapped, dtype=np.float64),
        }
        with self._lock:
            self._parts.append(part)
            self._rows += n
            due = self._rows >= self.rows_per_file
        if due:
            self.flush()

    def maybe_flush(self) -> None:
        if self._rows and time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> pathlib.Path | None:
        with self._lock:
            parts, self._parts, self._rows = self._parts, [], 0
            self._last_flush = time.monotonic()
            self._seq += 1
            seq = self._seq
        if not parts:
            return None
        frame = pl.concat([pl.DataFrame({k: part[k] for k in SCHEMA}).cast(SCHEMA) for part in parts])
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
