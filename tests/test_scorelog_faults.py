"""The score log when files cannot be written: records kept (within a bound) and retried,
what is lost counted by reason and logged once per episode, temporary files cleaned up,
the shutdown flush reporting what it could not write -- with injected errors, on a tiny
real filesystem, and through a real server stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
from conftest import get_case
from helpers import calibrate, make_registry, read_log, rows

from muse.server import scorelog_files
from muse.server.metrics import Metrics
from muse.server.scorelog import DISK_FULL, ENCODE_ERROR, IO_ERROR, SHUTDOWN, ScoreLog
from muse.server.testing import LocalServer, as_json_rows, deploy, wait_until

T0 = 1_700_000_000_000_000  # microseconds since the epoch


class Rows:
    """Appends rows numbered in order (the margin is the row's number), and counts them."""

    def __init__(self, log: ScoreLog):
        self.log = log
        self.appended = 0

    def append(self, n: int) -> np.ndarray:
        m = np.arange(self.appended, self.appended + n, dtype=float)
        self.log.append("t", "fraud", "p", "1", "active", 1, m, m / 2, m / 4, np.full(n, T0, dtype=np.int64))
        self.appended += n
        return m


def on_disk(directory: pathlib.Path) -> list[float]:
    return read_log(directory)["margin"].to_list()


def temporary_files(directory: pathlib.Path) -> list[pathlib.Path]:
    return list(directory.glob(".scores-*.tmp"))


def messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "muse.scorelog" and r.levelno == level]


class FailingWrites:
    """Stands in for scorelog_files._write_file: fails with ``error`` (an errno) while set, after
    writing half the file, as a full disk does."""

    def __init__(self, monkeypatch):
        self.real = scorelog_files._write_file
        self.error: int | None = None
        self.calls = 0
        monkeypatch.setattr(scorelog_files, "_write_file", self)

    def __call__(self, path: pathlib.Path, data: memoryview) -> None:
        self.calls += 1
        if self.error is None:
            return self.real(path, data)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(self.error, os.strerror(self.error), str(path))


def test_failed_writes_keep_records_within_the_bound_and_retry(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, "muse.scorelog")
    writes = FailingWrites(monkeypatch)
    log = ScoreLog(tmp_path, rows_per_file=10, flush_seconds=3600, max_pending_rows=25)
    metrics = Metrics()
    metrics.watch_score_log(log)
    rows = Rows(log)

    def sample(name: str, **labels: str) -> float | None:
        metrics.flush()
        return metrics.registry.get_sample_value(name, labels)

    assert sample("muse_scorelog_dropped_records_total", reason=DISK_FULL) == 0  # every reason shows, at 0
    writes.error = errno.ENOSPC
    rows.append(8)
    assert log.flush() == [] and writes.calls == 1  # no exception: kept for the next flush
    assert log.failing == DISK_FULL and log.pending == 8 and log.stats.dropped_total == 0
    assert not list(tmp_path.iterdir())  # the half-written temporary file is gone
    rows.append(12)  # a buffer filled: due at once when writes succeed, but retried on flush_seconds now
    assert not log.due
    assert log.flush() == [] and writes.calls == 2  # stops at the first failure: no write per buffer
    assert log.pending == 20 and log.stats.dropped_total == 0
    rows.append(15)  # 35 rows waiting, 25 kept: the 10 oldest are dropped
    assert log.flush() == [] and log.pending == 25
    assert log.stats.dropped == {DISK_FULL: 10, IO_ERROR: 0, ENCODE_ERROR: 0, SHUTDOWN: 0}
    assert sample("muse_scorelog_dropped_records_total", reason=DISK_FULL) == 10
    assert sample("muse_scorelog_write_failures_total", reason=DISK_FULL) == 3
    assert sample("muse_scorelog_pending_records") == 25 and sample("muse_scorelog_records_total") == 0
    (warning,) = messages(caplog, logging.WARNING)  # one warning for the episode, not one per flush
    assert str(tmp_path) in warning and DISK_FULL in warning and "25 records" in warning
    assert not messages(caplog, logging.INFO) and not temporary_files(tmp_path)

    writes.error = None  # space again: the kept rows are written, in order, in files of up to 10 rows
    files = log.flush()
    assert [pl.read_parquet(f).height for f in files] == [10, 10, 5]
    assert on_disk(tmp_path) == list(range(10, 35)) and log.pending == 0 and log.failing is None
    (recovered,) = messages(caplog, logging.INFO)
    assert "10 records dropped" in recovered and DISK_FULL in recovered
    assert sample("muse_scorelog_records_total") == 25 and sample("muse_scorelog_pending_records") == 0

    writes.error = errno.EACCES  # a second episode, another reason: a second warning
    rows.append(30)
    assert log.flush() == [] and log.stats.dropped[IO_ERROR] == 5 and log.pending == 25
    assert len(messages(caplog, logging.WARNING)) == 2 and IO_ERROR in messages(caplog, logging.WARNING)[1]
    assert sample("muse_scorelog_dropped_records_total", reason=IO_ERROR) == 5
    assert rows.appended == len(on_disk(tmp_path)) + log.stats.dropped_total + log.pending
    assert not temporary_files(tmp_path)


def test_retry_waits_for_flush_seconds(tmp_path, monkeypatch):
    writes = FailingWrites(monkeypatch)
    writes.error = errno.EIO
    log = ScoreLog(tmp_path, rows_per_file=4, flush_seconds=0.05)
    rows = Rows(log)
    rows.append(9)
    assert log.due  # two full buffers
    log.flush()
    assert log.failing == IO_ERROR and not log.due  # not retried at every poll
    wait_until(lambda: log.due, 5, "the retry to be due after flush_seconds")
    writes.error = None
    assert len(log.flush()) == 3 and on_disk(tmp_path) == list(range(9)) and not log.due


def test_records_polars_cannot_encode_are_dropped_alone(tmp_path, monkeypatch, caplog):
    log = ScoreLog(tmp_path, rows_per_file=5, flush_seconds=3600)
    rows = Rows(log)
    rows.append(12)  # three files' worth: 5, 5, 2
    real = pl.DataFrame.write_parquet
    calls = []

    def write_parquet(frame, *args, **kwargs):
        calls.append(frame.height)
        if len(calls) == 2:
            raise pl.exceptions.ComputeError("cannot encode")
        return real(frame, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", write_parquet)
    assert len(log.flush()) == 2  # the other two files are written
    assert on_disk(tmp_path) == [0, 1, 2, 3, 4, 10, 11] and log.pending == 0
    assert log.stats.dropped[ENCODE_ERROR] == 5 and log.stats.failed[ENCODE_ERROR] == 1
    assert any("cannot encode" in m for m in messages(caplog, logging.WARNING))
    assert not temporary_files(tmp_path)


def test_shutdown_counts_and_logs_what_it_could_not_write(tmp_path, monkeypatch, caplog):
    writes = FailingWrites(monkeypatch)
    log = ScoreLog(tmp_path, rows_per_file=10, flush_seconds=3600)
    rows = Rows(log)
    rows.append(7)
    log.flush()  # written
    writes.error = errno.ENOSPC
    rows.append(13)
    assert log.close() == 13
    assert log.stats.dropped[SHUTDOWN] == 13 and log.pending == 0 and on_disk(tmp_path) == list(range(7))
    (error,) = messages(caplog, logging.ERROR)
    assert "13 records" in error and "shutdown" in error and str(tmp_path) in error
    writes.error = None
    healthy = ScoreLog(tmp_path / "healthy")
    Rows(healthy).append(3)
    assert healthy.close() == 0 and healthy.stats.dropped_total == 0 and len(on_disk(tmp_path / "healthy")) == 3


def test_temporary_files_of_gone_writers_are_removed_at_start(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    me = os.getpid()

    def temp(pid: int, seq: int, age: float = 0.0) -> pathlib.Path:
        f = tmp_path / f".scores-{int(time.time() * 1000):013d}-{pid}-{seq:06d}.parquet.tmp"
        f.write_bytes(b"PAR1 half a file")
        if age:
            os.utime(f, (time.time() - age, time.time() - age))
        return f

    dead = temp(dead_pid, 1)  # its writer exited (its pid unused since, barring a wrap-around)
    reused = temp(me, 2, age=10 * 365 * 86400)  # our pid, but written long before this process started
    being_written = temp(me, 3)  # another score log of this process, writing now
    other_worker = temp(1, 4)  # pid 1 lives and started before this file
    unrelated = tmp_path / ".keep.tmp"
    unrelated.write_bytes(b"")
    ScoreLog(tmp_path)
    assert not dead.exists() and not reused.exists()
    assert being_written.exists() and other_worker.exists() and unrelated.exists()


def test_writer_gone_sees_a_reused_pid():
    assert scorelog_files.writer_gone(os.getpid(), time.time() - 10 * 365 * 86400)
    assert not scorelog_files.writer_gone(os.getpid(), time.time())


def test_score_log_failures_are_not_deployment_watcher_failures(tmp_path, caplog):
    """The watcher's three jobs fail apart: a failing refresh does not skip the score log's
    flush, and a failing flush is reported as the score log's."""
    from muse.core.registry import Registry
    from muse.server.serving import Serving

    log = ScoreLog(tmp_path, flush_seconds=0.001)
    serving = Serving(Registry(tmp_path / "no-registry"), Metrics(), poll_interval=0.001, score_log=log)
    calls = {"refresh": 0, "flush": 0}

    async def refresh() -> bool:
        calls["refresh"] += 1
        raise RuntimeError("bad deployment")

    def flush() -> list:
        calls["flush"] += 1
        raise RuntimeError("unexpected")

    serving.refresh = refresh  # type: ignore[method-assign]
    log.flush = flush  # type: ignore[method-assign]
    Rows(log).append(3)

    async def run() -> None:
        task = asyncio.create_task(serving._watch())
        try:
            while calls["flush"] < 3:  # each poll refreshes, then flushes, both failing
                await asyncio.sleep(0.001)
                assert not task.done(), task
        finally:
            task.cancel()

    try:
        asyncio.run(asyncio.wait_for(run(), 10))
    finally:
        serving._loader.shutdown()
        serving.pool.thread.close()
    labels = [r.getMessage() for r in caplog.records if r.name == "muse.serve"]
    assert labels.count("score log flush") == calls["flush"]
    assert labels.count("deployment watcher") == calls["refresh"] >= calls["flush"]


# -- a real (tiny) filesystem ----------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("filling a real filesystem needs root, to mount a tiny tmpfs")
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_every_record_is_on_disk_pending_or_counted(tiny_disk, caplog):
    caplog.set_level(logging.INFO, "muse.scorelog")
    directory = tiny_disk / "log"
    log = ScoreLog(directory, rows_per_file=1000, flush_seconds=3600, max_pending_rows=3000)
    rows = Rows(log)
    removed = 0  # rows in files this test removes

    def accounted() -> bool:
        return len(on_disk(directory)) + removed + log.stats.dropped_total + log.pending == rows.appended

    def fill(enough) -> None:
        """Append and flush (nothing raises) until ``enough()``, the accounting exact throughout."""
        for _ in range(1000):
            rows.append(700)
            log.flush()
            assert accounted() and not temporary_files(directory)
            if enough():
                return
        raise AssertionError("the disk never filled")

    fill(lambda: log.stats.failed[DISK_FULL] >= 5)  # full for five flushes: past the bound, rows dropped
    assert log.stats.dropped[DISK_FULL] > 0 and log.pending == 3000
    assert len(messages(caplog, logging.WARNING)) == 1

    written = on_disk(directory)
    oldest = sorted(directory.glob("scores-*.parquet"))[:4]  # space again
    removed = sum(pl.read_parquet(f).height for f in oldest)
    for f in oldest:
        f.unlink()
    newest = list(range(rows.appended - log.pending, rows.appended))
    log.flush()
    assert log.pending == 0 and log.failing is None and accounted()
    assert on_disk(directory) == written[removed:] + newest  # the oldest files removed, the kept rows added
    (recovered,) = messages(caplog, logging.INFO)
    assert f"{log.stats.dropped[DISK_FULL]} records dropped" in recovered

    fill(lambda: log.failing is not None)  # full again, then the server stops
    pending = log.pending
    assert pending > 0 and log.close() == pending
    assert log.stats.dropped[SHUTDOWN] == pending and log.pending == 0 and accounted()
    assert not temporary_files(directory)
    assert len(messages(caplog, logging.WARNING)) == 2 and len(messages(caplog, logging.ERROR)) == 1


@pytest.fixture(scope="module")
def reg(tmp_path_factory, model_dir):
    from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec

    root = tmp_path_factory.mktemp("scorelog-faults")
    reg = make_registry(root / "registry", {"lightgbm": get_case("lightgbm", model_dir, root / "compiled")})
    calibrate(reg, "lightgbm", {})
    deploy(
        reg,
        DeploymentSpec(
            predictors=[PredictorSpec("a", "1", "fraud", ["lightgbm/1"], "lightgbm/1")],
            routes=[RouteSpec("*", "fraud", "a")],
        ),
    )
    return reg


def test_server_on_a_full_disk_serves_on_and_reports_at_sigterm(reg, tiny_disk):
    """`muse serve` logging scores to a 256 KiB filesystem: every request is served once the
    disk is full, /metrics shows the failures and records waiting, and SIGTERM logs how many
    records it could not write -- which, with those on disk, are every row served."""
    directory = tiny_disk / "log"
    server = LocalServer(reg.root, "--no-auth", "--score-log", str(directory), "--score-log-flush-seconds", "0.05")
    served = 0

    def score_until_full() -> bool:
        nonlocal served
        for i in range(10):
            events = [{"features": r} for r in as_json_rows(rows(200, seed=served + i))]
            status, body, _ = server.post("/v1/score", {"tenant": "acme", "intent": "fraud", "events": events})
            assert status == 200, body
            served += len(body["scores"])
        return server.metrics().get('muse_scorelog_write_failures_total{reason="disk_full"}', 0) >= 3

    try:
        server.wait_ready()
        wait_until(score_until_full, 120, "the score log's filesystem to fill")
        metrics = server.metrics()
        assert metrics["muse_scorelog_pending_records"] > 0
        assert sum(v for k, v in metrics.items() if k.startswith("muse_scorelog_dropped_records_total")) == 0
        assert metrics["muse_scorelog_records_total"] == len(on_disk(directory)) > 0
    finally:
        server.stop()  # SIGTERM
    output = server.log_path.read_text(errors="replace")
    assert server.proc.returncode == 0, output[-4000:]
    lost = re.findall(r"score log: (\d+) records could not be written to \S+ at shutdown", output)
    assert len(lost) == 1, output[-4000:]
    assert len(on_disk(directory)) + int(lost[0]) == served
    assert output.count("score log: cannot write to") == 1  # one warning, for the one episode
    assert "deployment watcher" not in output and "Traceback" not in output
    assert not temporary_files(directory)


def test_replicas_sharing_the_directory_never_share_a_name_nor_remove_each_others_files(tmp_path):
    """Pids repeat across hosts (containers start at 1): names carry the host, and another host's
    temporary file goes only once it is older than any write."""
    from muse.server import scorelog_files as disk

    assert f"-{disk.HOST}-{os.getpid()}-000007.parquet" in disk.file_name(7)

    def temp(host: str, age: float) -> pathlib.Path:
        f = tmp_path / f".scores-{int(time.time() * 1000):013d}-{host}-{os.getpid()}-000001.parquet.tmp"
        f.write_bytes(b"PAR1 half a file")
        os.utime(f, (time.time() - age, time.time() - age))
        return f

    writing = temp("pod-7f9c-2", age=5)  # our pid on another host: no sign of its writer's death
    left = temp("pod-1a2b-9", age=2 * disk.FOREIGN_ORPHAN_SECONDS)
    ours = temp(disk.HOST, age=10 * 365 * 86400)  # our host and pid, but from before this process
    ScoreLog(tmp_path)
    assert writing.exists() and not left.exists() and not ours.exists()


def test_long_host_names_stay_apart_in_file_names():
    """Pods of one Deployment share a long name prefix: cut to 40 characters, their tags differ
    by a hash of the whole name, and carry only what file names may."""
    from muse.server.scorelog_files import _host_tag

    a = _host_tag("fraud-scoring-muse-production-eu-west-1-7d9f8c6b5-abcde")
    b = _host_tag("fraud-scoring-muse-production-eu-west-1-7d9f8c6b5-fghij")
    assert a != b and len(a) <= 40 and len(b) <= 40 and re.fullmatch(r"[A-Za-z0-9-]+", a)
    assert _host_tag("short-host") == "short-host" and _host_tag("héllo.local") == "h-llo-local"
