"""The score log's directory on disk, shared by every worker of a server: files
written durably (a temporary name holding the writer's pid, fsync, rename, the
directory's fsync), temporary files of writers that are gone, and the size budget.

File names sort by time: ``scores-<unix ms>-<host>-<pid>-<seq>.parquet``; a file being
written is ``.scores-<unix ms>-<host>-<pid>-<seq>.parquet.tmp``.  The host is in the name
because replicas may share the directory (a volume mounted by every pod) and pids repeat
across hosts and containers: without it, two replicas' files could take one name."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import re
import socket
import time

from muse.core.files import fsync_path

log = logging.getLogger("muse.scorelog")

# The host part is absent from names written before it was added.
_TEMP = re.compile(r"^\.scores-\d+-(?:([A-Za-z0-9-]+)-)?(\d+)-\d+\.parquet\.tmp$")
# Another host's temporary file is judged by age alone (its pid means nothing here): a write
# takes seconds, so one this old was left by a writer that died.
FOREIGN_ORPHAN_SECONDS = 3600.0


def _host_tag(name: str) -> str:
    """The host name as file names carry it: at most 40 characters, cut ones ending in a hash of
    the whole name, so that pods whose long names share a prefix still differ."""
    tag = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-") or "host"
    if len(tag) <= 40:
        return tag
    return f"{tag[:31].strip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


HOST = _host_tag(socket.gethostname())


def file_name(seq: int) -> str:
    return f"scores-{int(time.time() * 1000):013d}-{HOST}-{os.getpid()}-{seq:06d}.parquet"


def write_durably(directory: pathlib.Path, name: str, data: memoryview) -> pathlib.Path:
    """``directory/name`` holding ``data``, complete on disk when this returns; nothing is left
    behind when it raises (a temporary file that could not be removed goes at the next start).

    fsync before the rename: otherwise a power cut can leave a renamed but empty or torn file
    (ext4 and XFS allocate late), and `muse calib fit`, which reads every file, fails on it.
    Measured: ~1 ms more for a 100,000-row (2.2 MB) file, the directory's fsync ~0.1 ms, on a
    virtio ext4 disk -- once a file, on the loader thread, GIL released."""
    tmp = directory / f".{name}.tmp"
    try:
        _write_file(tmp, data)
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # best effort: the file is in place either way
        fsync_path(directory)  # the rename, durable
    return directory / name


def _write_file(path: pathlib.Path, data: memoryview) -> None:
    """Create ``path`` (it must not exist) holding ``data``, on disk before this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_started(pid: int) -> float | None:
    """Unix time process ``pid`` started (Linux's /proc; None elsewhere or if it is gone)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if fields[0] in ("Z", "X"):  # a zombie writes nothing more
            return float("inf")
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in ticks since boot
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def writer_gone(pid: int, mtime: float) -> bool:
    """Whether the process that wrote a temporary file last modified at ``mtime`` is gone: no
    process has its pid, or the one that has it started after the file was written (its pid
    was reused, as it is in a restarted container)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process
    started = _process_started(pid)
    # btime is whole seconds (rounded down), so ``started`` is never late: a live writer's file is
    # never older than it; the second's margin is for a clock stepped back meanwhile.
    return started is not None and mtime < started - 1.0


def remove_orphans(directory: pathlib.Path) -> list[pathlib.Path]:
    """Remove temporary files whose writer is gone (a process killed mid-write; several
    workers, and maybe several hosts, share the directory, so only those)."""
    removed, failures = [], []
    try:
        names = os.listdir(directory)
    except OSError as exc:
        names, failures = [], [exc]
    for name in names:
        match = _TEMP.match(name)
        if not match:
            continue
        f = directory / name
        host, pid = match[1], int(match[2])
        try:
            mtime = f.stat().st_mtime
            gone = writer_gone(pid, mtime) if host in (None, HOST) else time.time() - mtime > FOREIGN_ORPHAN_SECONDS
            if gone:
                f.unlink()
                removed.append(f)
        except FileNotFoundError:  # another worker removed it first
            pass
        except OSError as exc:
            failures.append(exc)
    if removed:
        log.info("score log: removed %d temporary files left in %s by stopped processes", len(removed), directory)
    if failures:
        log.warning("score log: cannot remove temporary files left in %s: %s", directory, failures[0])
    return removed


def enforce_budget(directory: pathlib.Path, max_bytes: int) -> None:
    """Delete the oldest files until the log holds at most ``max_bytes`` (the newest file always
    stays).  OSError when the directory cannot be read or a file removed."""
    files, sizes = [], []
    for f in sorted(directory.glob("scores-*.parquet")):
        try:
            sizes.append(f.stat().st_size)
            files.append(f)
        except FileNotFoundError:  # another worker's budget pass got there first
            pass
    total = sum(sizes)
    for f, size in zip(files[:-1], sizes):
        if total <= max_bytes:
            break
        f.unlink(missing_ok=True)  # another worker may have removed it first
        total -= size
        log.warning("score log over %d bytes: removed %s", max_bytes, f.name)
