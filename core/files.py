"""Writing registry files durably: a file appears whole or not at all, and stays after a crash."""

from __future__ import annotations

import os
import pathlib
import secrets


def fsync_path(path: pathlib.Path) -> None:
    """Make ``path``'s content (a file) or its entries (a directory: a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: pathlib.Path, data: bytes) -> pathlib.Path:
    """``path`` holding ``data``: written to a hidden temporary name beside it, fsynced, renamed
    onto it, the directory fsynced; nothing is left behind when it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path
