"""What a server does beside serving when its registry is on object storage (core/remote.py):
it follows the store into its local mirror, which the workers poll as they would a local
registry, and uploads its score log.

Both run as threads of the supervising process, once a replica however many workers it has.

- Following: `current` read with If-None-Match every poll (0.25 s), keys.toml every fourth;
  a change pulls the new files, then moves the mirror's `current`.  While the store cannot be
  reached the replica serves what its mirror holds and says so once, then once when it is back.
- Uploading: every complete score-log file (the workers rename them into place whole) goes to
  ``scorelog/replica=ID/NAME`` and is deleted here only once the store has it; the last pass
  runs after the workers have stopped and flushed (SIGTERM), so nothing is lost on a stop.
  While the store is down files wait on disk under the score log's size budget."""

from __future__ import annotations

import logging
import os
import pathlib
import re
import threading

from muse.core.objectstore import ObjectExists, StoreError, sha256
from muse.core.remote import Mirror

from .logs import Outage
from .scorelog_files import HOST

log = logging.getLogger("muse.replica")

UPLOAD_EVERY = 5.0  # seconds between uploads of the score log's finished files
_REPLICA_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def replica_id(given: str | None = None) -> str:
    """``given``, else $MUSE_REPLICA_ID, else the host name (a pod's name on Kubernetes)."""
    value = given or os.environ.get("MUSE_REPLICA_ID") or HOST
    if not _REPLICA_RE.match(value):
        raise ValueError(
            f"replica id {value!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(--replica-id or MUSE_REPLICA_ID)"
        )
    return value


def upload_score_log(mirror: Mirror, directory: pathlib.Path, replica: str) -> int:
    """Upload ``directory``'s finished score-log files, deleting each once stored; returns how many."""
    sent = 0
    failed: list[str] = []
    # this host's files only: a directory shared with other pods holds theirs, which they upload
    for path in sorted(directory.glob(f"scores-*-{HOST}-*.parquet")):
        key = f"scorelog/replica={replica}/{path.name}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # the size budget deleted it meanwhile
            continue
        try:
            try:
                mirror.store.put(key, data, create=True)
            except ObjectExists:  # stored by a pass that stopped before deleting the file
                blob = mirror.store.get(key)
                if blob is None or blob.sha256 != sha256(data):
                    raise StoreError(f"{mirror.store.where(key)} holds another file of this name") from None
        except StoreError as exc:  # this file waits; the others go on
            failed.append(f"{path.name}: {exc}")
            continue
        path.unlink(missing_ok=True)
        sent += 1
    if failed:
        raise StoreError(f"{len(failed)} score-log files kept in {directory} for the next pass; the first: {failed[0]}")
    return sent


def follow_in_background(
    mirror: Mirror, stop: threading.Event, interval: float, logger: logging.Logger, event: str, name: str
) -> None:
    """``mirror.follow`` on a daemon thread until ``stop`` (not waited for at stop: it may be
    mid-pull); its failures logged once as they start and once as they end."""
    follow = Outage(logger, f"following {mirror.url}", event)
    threading.Thread(
        target=mirror.follow, args=(stop, interval, follow.failed, follow.ok), name=name, daemon=True
    ).start()


class ReplicaSync:
    def __init__(self, mirror: Mirror, poll_interval: float, score_log: pathlib.Path | None, replica: str):
        self.mirror = mirror
        self.poll_interval = poll_interval
        self.score_log = score_log
        self.replica = replica
        self._stop = threading.Event()
        self._uploader: threading.Thread | None = None

    def start(self) -> None:
        follow_in_background(self.mirror, self._stop, self.poll_interval, log, "store", "muse-follow")
        if self.score_log is not None:
            self._uploader = threading.Thread(target=self._uploads, name="muse-upload", daemon=True)
            self._uploader.start()

    def _uploads(self) -> None:
        outage = Outage(log, f"uploading the score log to {self.mirror.url}/scorelog/replica={self.replica}", "store")
        while not self._stop.wait(UPLOAD_EVERY):
            try:
                upload_score_log(self.mirror, self.score_log, self.replica)  # type: ignore[arg-type]
                outage.ok()
            except Exception as exc:  # the thread must outlive any one failure
                outage.failed(exc)

    def stop(self) -> None:
        """Stop following; upload what the stopped workers left (call after they exit)."""
        self._stop.set()
        # the uploader briefly, so that its pass and the last one do not upload the same files at once
        if self._uploader is not None:
            self._uploader.join(timeout=10)
        if self.score_log is not None and self.score_log.is_dir():
            try:
                sent = upload_score_log(self.mirror, self.score_log, self.replica)
                log.info("uploaded %d score-log files on stop", sent, extra={"event": "scorelog_uploaded"})
            except Exception as exc:
                log.error(
                    "could not upload the score log on stop (%s); its files stay in %s and go at the next start",
                    exc,
                    self.score_log,
                    extra={"event": "scorelog_upload_failed"},
                )
