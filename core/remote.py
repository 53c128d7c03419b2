"""A registry on object storage, used through a local mirror.

Every command and every server works on a local directory in the registry's layout
(core/registry.py).  For a registry at a URL that directory is a mirror in the host's cache
(``$MUSE_CACHE_DIR``, else ``~/.cache/muse``, then ``registries/<hash of the URL>``), which
records its URL in ``.muse-remote.json``; ``Registry(mirror)`` finds it there, so code that
writes the registry needs to know of the store only where a write must be atomic across hosts:

- **pull** lists the registry and downloads what is new or changed, each file checked against
  the sha256 it was written with and renamed into place; files are immutable, so a library is
  downloaded once per host.  `deployments/current` moves last and only forward, so a server
  polling the mirror never sees a generation before its artifacts.
- **push** uploads what a command wrote into the mirror: new files with create-if-absent (a
  version directory's manifest.json or calibration.json first: the one that claims the
  version, so two hosts that wrote the same version number mix nothing), changed ones
  (keys.toml) with If-Match on the ETag pulled.
- **publish** claims generation N by creating `deployments/N.toml` only if absent, then moves
  `current` with If-Match on the ETag read before: two publishers never share a number, and
  `current` never moves back (the loser re-reads, see publish).
- **follow** (servers) reads `current` and `keys.toml` with If-None-Match every poll and pulls
  when either changed.

Score logs are not mirrored (server/replica.py uploads them; readers scan the URL)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .files import write_atomic
from .objectstore import Blob, ObjectChanged, ObjectExists, ObjectInfo, ObjectMissing, ObjectStore, StoreError, sha256

MARKER = ".muse-remote.json"
LOCK = ".muse-remote.lock"
CONFLICTS = ".conflicts"  # a version another host claimed first: this host's copy, moved aside
# key -> [etag, sha256, size, mtime_ns] of each file the mirror holds as the store has it: a
# file whose size and mtime are unchanged is not hashed again to find what a command wrote
INDEX = ".muse-remote-index.json"
Entry = list[Any]
CURRENT = "deployments/current"
KEYS = "keys.toml"
# What a mirror holds: the registry but its score log, locks and anything hidden.
MIRRORED_DIRS = ("models", "references", "calibrations", "deployments", "labels", "audit")
KEYS_EVERY = 4  # follow(): keys.toml is read every 4th poll, `current` every poll
FOLLOW_BACKOFF_MAX = 30.0  # seconds between polls at most, while they fail
CLAIM_FILES = ("manifest.json", "calibration.json")  # uploaded first: whoever creates it owns the version


class PublishConflict(StoreError):
    """Generation ``after`` is no longer current: a deployment derived from it must not be published."""


def cache_root() -> pathlib.Path:
    base = os.environ.get("MUSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "muse")
    return pathlib.Path(base) / "registries"


def _mirrored(key: str) -> bool:
    parts = key.split("/")
    if any(p.startswith(".") or not p for p in parts):
        return False
    return key == KEYS or (len(parts) > 1 and parts[0] in MIRRORED_DIRS)


def _generation(data: bytes, where: str) -> int:
    text = data.decode(errors="replace").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise StoreError(f"{where}: expected a generation number, found {text[:40]!r}")
    return int(text)


@dataclasses.dataclass
class Mirror:
    store: ObjectStore
    root: pathlib.Path
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This mirror to ourselves: a replica's follow thread, its workers publishing through
        the admin API and commands on the same host share it.  A thread lock, and a POSIX record
        lock (lockf) between processes: unlike an flock, a child forked meanwhile (Granian forks
        its workers) does not inherit it, so it cannot be held for ever by a worker."""
        with self._lock:
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    @classmethod
    def open(cls, url: str, cache: pathlib.Path | None = None) -> Mirror:
        """The mirror of the registry at ``url`` in this host's cache (made if new)."""
        store = ObjectStore(url)
        root = (cache or cache_root()) / hashlib.sha256(store.url.encode()).hexdigest()[:20]
        root.mkdir(parents=True, exist_ok=True)
        marker = root / MARKER
        if not marker.exists():
            write_atomic(marker, json.dumps({"url": store.url}).encode())
        return cls(store, root)

    @classmethod
    def of(cls, root: pathlib.Path) -> Mirror | None:
        """The mirror whose local directory is ``root``; None for a plain local registry."""
        try:
            url = json.loads((root / MARKER).read_bytes())["url"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise StoreError(
                f"{root / MARKER}: unreadable; delete the folder {root} and run the command again"
            ) from None
        return cls(ObjectStore(url), root)

    @property
    def url(self) -> str:
        return self.store.url

    # -- the index: what the mirror holds from the store ------------------------------------
    def _index(self) -> dict[str, Entry]:
        try:
            index = json.loads((self.root / INDEX).read_bytes())
            return index if isinstance(index, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}  # a lost index costs downloads, never correctness: pull compares ETags

    def _save_index(self, index: dict[str, Entry]) -> None:
        write_atomic(self.root / INDEX, json.dumps(index, sort_keys=True).encode())

    # -- pull ---------------------------------------------------------------------------------
    def pull(self) -> int:
        """Bring the mirror up to the store; returns the number of files downloaded."""
        with self._locked():
            index = self._index()
            # `current` before the listing: the generation it names was stored before it moved,
            # so the listing holds that generation's file
            try:
                current: Blob | None = self._download(CURRENT)
            except ObjectMissing:
                current = None
            # the mirrored folders only: scorelog/ grows with every replica's uploads
            listed = [
                o for d in MIRRORED_DIRS for o in self.store.list(f"{d}/") if _mirrored(o.key) and o.key != CURRENT
            ]
            keys = self.store.head(KEYS)
            if keys is not None:
                listed.append(keys)
            fetched = 0
            try:
                fetched = self._fetch(listed, index)
            finally:
                self._save_index(index)  # what was fetched before a failure is not fetched again
            if current is not None:
                self._advance_current(_generation(current.data, self.store.where(CURRENT)))
            return fetched

    def _fetch(self, listed: list[ObjectInfo], index: dict[str, Entry]) -> int:
        fetched = 0
        for obj in listed:
            held = index.get(obj.key)
            if held and held[0] == obj.etag and (self.root / obj.key).exists():
                continue
            blob = self._download(obj.key)  # ObjectStore.get refuses one over MAX_OBJECT_BYTES
            index[obj.key] = self._entry(obj.key, blob.etag, blob.data)
            fetched += 1
        return fetched

    def _download(self, key: str) -> Blob:
        blob = self.store.get(key)
        assert blob is not None
        if blob.sha256 is not None and sha256(blob.data) != blob.sha256:
            raise StoreError(
                f"{self.store.where(key)}: content does not match its sha256 (a corrupt or partial object); "
                "upload it again"
            )
        if key != CURRENT:
            try:
                write_atomic(self.root / key, blob.data)
            except OSError as exc:  # e.g. a name too long for this filesystem, or a file where a folder is
                raise StoreError(
                    f"{self.store.where(key)}: cannot be mirrored in {self.root} ({exc.strerror or exc}); "
                    "remove or rename the object"
                ) from None
        return blob

    def _advance_current(self, generation: int) -> None:
        """Move the mirror's `current` to ``generation`` unless it is already there or beyond
        (generations only grow; a rollback is a new, higher one)."""
        path = self.root / CURRENT
        with contextlib.suppress(FileNotFoundError, ValueError):
            if int(path.read_text().strip()) >= generation:
                return
        if not (self.root / f"deployments/{generation}.toml").exists():
            raise StoreError(f"{self.store.where(CURRENT)} names generation {generation}, which the store lacks")
        write_atomic(path, f"{generation}\n".encode())

    # -- push ---------------------------------------------------------------------------------
    def push(self) -> int:
        """Upload what was written into the mirror since the last pull; returns the files sent.
        Raises StoreError naming the first conflict; nothing after it is sent (the claim file
        comes first, so nothing of a version another host claimed is mixed into it)."""
        with self._locked():
            index = self._index()
            pending: list[str] = []
            for key in self._local_keys():
                if not self._unchanged(key, index.get(key)):
                    pending.append(key)
            # claim files first, then the rest of their version
            pending.sort(key=lambda k: (os.path.dirname(k), k.rsplit("/", 1)[-1] not in CLAIM_FILES, k))
            sent = 0
            try:
                for key in pending:
                    data = (self.root / key).read_bytes()
                    held = index.get(key)
                    try:
                        etag = self.store.put(key, data, if_match=held[0]) if held else self._create(key, data)
                    except (ObjectExists, ObjectChanged) as exc:  # nothing after it is sent
                        raise StoreError(f"{exc}: another host wrote it meanwhile; {self._set_aside(key)}") from None
                    index[key] = self._entry(key, etag, data)
                    sent += 1
            finally:
                self._save_index(index)
            return sent

    def _set_aside(self, key: str) -> str:
        """Move this host's copy of what another host claimed first out of the mirror (a
        version's whole folder), so the next pull takes the store's and nothing of the two
        mixes; says where it went.  keys.toml stays: the next pull replaces it."""
        if key == KEYS:
            return "this command's change to keys.toml was not stored: run the command again"
        parts = key.split("/")
        unit = "/".join(parts[:3]) if parts[0] in ("models", "calibrations") and len(parts) > 3 else key
        aside = self.root / CONFLICTS / f"{unit}.{secrets.token_hex(4)}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / unit, aside)
        return f"this command's copy was moved to {aside}; run the command again (it will read the store's first)"

    def _entry(self, key: str, etag: str | None, data: bytes) -> Entry:
        st = (self.root / key).stat()
        return [etag, sha256(data), st.st_size, st.st_mtime_ns]

    def _unchanged(self, key: str, held: Entry | None) -> bool:
        """Whether the mirror's file ``key`` is still what the store holds (``held``, its index entry)."""
        if held is None:
            return False
        path = self.root / key
        st = path.stat()
        if len(held) == 4 and held[2:] == [st.st_size, st.st_mtime_ns]:
            return True
        return bool(held[1] == sha256(path.read_bytes()))

    def _local_keys(self) -> list[str]:
        """The mirrored files in the local directory (symbolic links followed: a test registry
        links its models), as keys."""
        keys = []
        for top in MIRRORED_DIRS:
            for folder, dirs, files in os.walk(self.root / top, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                base = pathlib.Path(folder).relative_to(self.root).as_posix()
                keys += [k for k in (f"{base}/{f}" for f in files) if _mirrored(k) and k != CURRENT]
        if (self.root / KEYS).is_file():
            keys.append(KEYS)
        return sorted(keys)

    def _create(self, key: str, data: bytes) -> str | None:
        """Create ``key``; an identical object already there counts as done (an earlier push
        that lost its index entry)."""
        try:
            return self.store.put(key, data, create=True)
        except ObjectExists:
            blob = self.store.get(key)
            assert blob is not None
            if blob.data != data:
                raise
            return blob.etag

    # -- generations --------------------------------------------------------------------------
    def current(self) -> tuple[int | None, str | None]:
        """The store's current generation and the ETag it was read at."""
        try:
            blob = self.store.get(CURRENT)
        except ObjectMissing:
            return None, None
        assert blob is not None
        return _generation(blob.data, self.store.where(CURRENT)), blob.etag

    def publish(self, raw: bytes, after: int | None = None) -> int:
        """Store ``raw`` as the next generation and make it current; with ``after``, only while
        generation ``after`` is current (PublishConflict otherwise).

        Claiming N.toml is create-if-absent: of two publishers one gets N, the other re-reads
        and claims a higher number.  Moving `current` is If-Match on the ETag read before the
        claim; if it moved meanwhile to a lower generation (a slower publisher), we move it
        again; to a higher one, our generation was overtaken: with ``after`` that is a
        conflict, without, we claim a number above it (the last publisher wins, as locally).
        A lost claim is deleted; one whose publisher died stays, never current (numbers only grow).

        What the mirror holds that the store lacks goes up first: a generation may name the
        calibration this command just fitted (a refresh), and replicas must find it there."""
        self.push()
        while True:
            generation, etag = self.current()
            self._check_after(generation, after)
            taken = [_generation_of(o.key) for o in self.store.list("deployments/")]
            claim = max([*(t for t in taken if t is not None), generation or 0]) + 1
            try:
                self.store.put(f"deployments/{claim}.toml", raw, create=True)
            except ObjectExists:
                continue  # another publisher took this number: read again
            moved = False
            try:
                moved = self._move_current(claim, etag, after)
            finally:
                if not moved:  # withdrawn, so that no rollback takes it for a generation that was served
                    with contextlib.suppress(StoreError):
                        self.store.delete(f"deployments/{claim}.toml")
            if moved:
                write_atomic(self.root / f"deployments/{claim}.toml", raw)
                self._advance_current(claim)
                return claim

    def _check_after(self, generation: int | None, after: int | None, claim: int | None = None) -> None:
        if after is not None and generation != after:
            stored = f" (its claim of generation {claim} is withdrawn)" if claim else ""
            raise PublishConflict(
                f"generation {generation} was published after generation {after}, from which this deployment "
                f"was derived{stored}"
            )

    def _move_current(self, claim: int, etag: str | None, after: int | None) -> bool:
        """Point `current` at ``claim``; False when a higher generation got there first."""
        while True:
            try:
                if etag is None:
                    self.store.put(CURRENT, f"{claim}\n".encode(), create=True)
                else:
                    self.store.put(CURRENT, f"{claim}\n".encode(), if_match=etag)
                return True
            except (ObjectChanged, ObjectExists):
                generation, etag = self.current()
                self._check_after(generation, after, claim)
                if generation is not None and generation > claim:
                    return False

    # -- servers: follow the store ------------------------------------------------------------
    def follow(
        self,
        stop: threading.Event,
        interval: float,
        on_error: Callable[[Exception], None],
        on_ok: Callable[[], None] = lambda: None,
    ) -> None:
        """Until ``stop``: every ``interval`` read `current` (and every KEYS_EVERY polls keys.toml)
        with If-None-Match and pull when one changed.  Errors go to ``on_error`` and the mirror
        stays as it was; the next poll that works calls ``on_ok``."""
        etags: dict[str, str | None] = {CURRENT: None, KEYS: None}
        polls = failures = 0
        while True:
            try:
                changed = False
                # keys every KEYS_EVERY polls: a revoked key stops working within a second
                keys = [CURRENT, KEYS] if polls % KEYS_EVERY == 0 else [CURRENT]
                polls += 1
                for key in keys:
                    etag = etags[key]
                    try:
                        blob = self.store.get(key, if_none_match=etag)
                    except ObjectMissing:
                        blob = None
                    if blob is not None:
                        etags[key] = blob.etag
                        changed = True
                if changed:
                    self.pull()
                on_ok()
                failures = 0
            except Exception as exc:  # the store is down or refused: serve on what the mirror holds
                etags = dict.fromkeys(etags)  # so the next poll that works pulls, whatever changed meanwhile
                failures += 1
                on_error(exc)
            # after failures, back off (up to 30 s): a broken object is not downloaded 4 times a second
            if stop.wait(min(FOLLOW_BACKOFF_MAX, interval * 2 ** min(failures, 8))):
                return


def _generation_of(key: str) -> int | None:
    """N for deployments/N.toml, else None."""
    stem = key.removeprefix("deployments/").removesuffix(".toml")
    return int(stem) if key.endswith(".toml") and stem.isdigit() else None
