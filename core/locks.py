"""The registry's refresh lock: one refresh fits and publishes at a time."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator

from .registry import Registry, RegistryError

LOCK_NAME = "refresh.lock"


@contextlib.contextmanager
def refresh_lock(reg: Registry, wait: float | None = None, stop: threading.Event | None = None) -> Iterator[None]:
    """The registry's refresh lock (an flock on REGISTRY/locks/refresh.lock: released by the
    kernel if its holder dies; it needs a local file system, as flock does).  Waits up to
    ``wait`` seconds (None: until ``stop`` is set, or for ever); TimeoutError naming the
    holder's pid when it cannot be had, InterruptedError when ``stop`` is set meanwhile."""
    if not reg.root.is_dir():
        raise RegistryError(f"--registry {reg.root}: no such directory")
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
