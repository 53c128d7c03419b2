"""The edge: HAProxy in front of `muse serve`, refusing a tenant's excess requests before they
reach the server, from the same ``[[quotas]]`` the server enforces on rows (server/quotas.py).

A refusal costs the server ~60 us of Granian and ASGI; at the edge it costs the server nothing,
so a flood from one tenant leaves the others' latency alone (bench/isolation.py).  The edge
counts requests, the server rows: the server stays exact, the edge only cuts floods.

**Tenant.** From the key's secret: ``muse_<id>_<secret>``, whose sha256 (hex) keys.map maps to
the tenant's token (the tenant's own name never becomes a map key: map files split at the
first blank).  A key with a forged id finds no tenant, or its own.

**Limit.** A tenant's requests admitted in the last W seconds (a stick table's gpc0 and its
rate over W; refused requests are not counted) are held to ceil(max(rows_per_second * W,
burst_rows)): over time the tenant's rate (or burst / W, when its burst is longer than W), and
at once no more than the larger of its burst and W of its rate -- the server's token bucket, at
one row a request, as a sliding window can hold it.  W defaults to 2 s, the default burst's
length.  (The first design, ceil(burst + rate * W) over 10 s, never refused what the server
would admit, but let a flood through at full speed until 12 s of its rate had passed, and the
server refused most of those itself.)  The server stays exact: it counts rows.

A tenant without a rate is not limited; requests with an unknown key, or none, share one limit
(--unknown-per-second) and go on to the server, which answers 401; admin and metrics keys are
never limited (an operator must be able to roll back during a flood).  So behind a server
without auth (`muse serve --no-auth`) every request is in that one limit: raise it, or keep
the edge for servers with keys.

Files, in one directory: haproxy.cfg, keys.map, limits.map, and edge.json (what `sync` needs).
`sync` follows the registry and replaces the maps in a running HAProxy through its runtime API
(prepare / add / commit map: each map changes atomically) after rewriting the files, so a
restart starts from what was last applied."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import pathlib
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import msgspec

from muse.core.deploy import DeploymentStore
from muse.core.files import write_atomic
from muse.core.registry import Registry
from muse.core.spec import QuotaSpec

from .auth import KeyRecord, keys_path, read_keys
from .logs import Outage
from .quotas import Quotas
from .replica import follow_in_background
from .schemas import ErrorBody

log = logging.getLogger("muse.edge")

DEFAULT_WINDOW = 2  # seconds: the length of the default burst (server/quotas.py BURST_SECONDS)
MAX_WINDOW = 3600
DEFAULT_UNKNOWN_PER_SECOND = 100.0
CONFIG, SETTINGS, KEYS_MAP, LIMITS_MAP, SOCKET = "haproxy.cfg", "edge.json", "keys.map", "limits.map", "haproxy.sock"
UNKNOWN = "unknown"  # the token of requests with an unknown key or none
OPERATOR = "operator"  # admin and metrics keys: never limited
POLL_SECONDS = 0.25  # as the replicas poll their registry
BACKOFF_MAX = 5.0  # seconds between attempts at most, while the registry or HAProxy fails
PAYLOAD_BYTES = 8192  # per `add map` command: the runtime API reads a command into one buffer (16 kB)
_SOCKET_PATH_MAX = 107  # sun_path
_HOST_PORT = re.compile(r"(\*|[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]+\])?:([0-9]{1,5})")
_SAFE_PATH = re.compile(r"[A-Za-z0-9._/@+=~-]+")  # written bare into haproxy.cfg and runtime commands
_DIGEST = re.compile(r"[0-9a-f]{64}")

_ENCODER = msgspec.json.Encoder()
Entries = list[tuple[str, str]]  # a map's (key, value) lines, neither holding a blank


class EdgeError(Exception):
    """HAProxy's runtime API refused or failed a command."""


class EdgeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What `render` fixed and `sync` and `Edge` read back: DIR/edge.json."""

    bind: str
    window: int
    unknown_per_second: float
    socket: str
    directory: str  # the maps' directory, as haproxy.cfg names them: HAProxy knows a map by that text


# -- names, as HAProxy will read them ----------------------------------------------------------


def host_port(flag: str, value: str) -> str:
    """``value`` if it is HOST:PORT (a host name, an IPv4 address, [IPv6] or * for every address)."""
    match = _HOST_PORT.fullmatch(value)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(f"{flag} {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8000, [::1]:8000 or *:8080")
    return value


def safe_path(flag: str, path: pathlib.Path) -> pathlib.Path:
    """``path`` made absolute, if HAProxy can read it bare in its configuration and runtime API."""
    path = path.absolute()
    if not _SAFE_PATH.fullmatch(str(path)):
        raise ValueError(
            f"{flag} {path}: HAProxy reads this path bare; use one of letters, digits and . _ / @ + = ~ - only"
        )
    return path


def tenant_token(tenant: str) -> str:
    """The tenant's key in the maps and the stick table: stable across renders, so a tenant keeps
    its count when its keys or limits change, and free of anything a map file would split."""
    return "t" + hashlib.sha256(tenant.encode()).hexdigest()[:24]


# -- the maps ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Maps:
    keys: Entries  # sha256(secret) -> tenant token, or OPERATOR (admin and metrics keys); never UNKNOWN
    limits: Entries  # token -> "REQUESTS:RETRY_AFTER:BASE64(JSON body of the 429)"
    notes: dict[str, str]  # token -> a comment for limits.map (the tenant's name, escaped)

    def files(self) -> dict[str, bytes]:
        keys = ["# sha256(secret) of each key -> its tenant's token (muse edge; see limits.map)"]
        keys += [f"{k} {v}" for k, v in self.keys]
        limits = ["# tenant token -> requests admitted per window:Retry-After:base64 of the 429's body (muse edge)"]
        for k, v in self.limits:
            limits += [f"# {self.notes[k]}", f"{k} {v}"]
        return {KEYS_MAP: "\n".join(keys).encode() + b"\n", LIMITS_MAP: "\n".join(limits).encode() + b"\n"}


def edge_limit(quotas: Sequence[QuotaSpec], tenant: str, window: int) -> int | None:
    """Requests ``tenant`` may send in ``window`` seconds at the edge; None: not limited."""
    return _requests(_resolved(quotas), tenant, window)


def _resolved(quotas: Sequence[QuotaSpec]) -> Quotas:
    """The server's own resolution of a tenant's limits (its entry over "*", field by field),
    for the whole server (one worker)."""
    resolved = Quotas(workers=1)
    resolved.configure(list(quotas), generation=0)
    return resolved


def _requests(resolved: Quotas, tenant: str, window: int) -> int | None:
    limits = resolved.limits(tenant)
    if limits.rows_per_second is None:
        return None
    return math.ceil(max(limits.rows_per_second * window, limits.burst_rows))


def limit_entry(tenant: str | None, requests: int, window: int) -> str:
    """limits.map's value for ``tenant`` (None: requests with an unknown key or none).  The body
    is the server's error shape, JSON-encoded here whatever the name holds, carried in base64:
    no blank, '#' or backslash reaches the map file or the runtime API."""
    retry = max(1, math.ceil(window / requests))  # a full window frees a request about this often
    who = "requests with an unknown key or none are over their limit"
    if tenant is not None:
        who = f"tenant {tenant!r} is over its quota"
    message = f"{who} at the edge: {requests:,} requests in {window} s; retry in {retry} s"
    body = base64.b64encode(_ENCODER.encode(ErrorBody(message))).decode()
    return f"{requests}:{retry}:{body}"


def render_maps(quotas: Sequence[QuotaSpec], keys: Sequence[KeyRecord], window: int, unknown_per_second: float) -> Maps:
    resolved = _resolved(quotas)
    key_entries: Entries = []
    tenants: set[str] = set()
    for record in keys:
        digest = record.sha256.lower()
        if not _DIGEST.fullmatch(digest):
            continue  # no secret hashes to it: the key cannot authenticate anywhere
        if record.admin or record.metrics or record.tenant is None:
            key_entries.append((digest, OPERATOR))
        else:
            key_entries.append((digest, tenant_token(record.tenant)))
            tenants.add(record.tenant)
    limits = [(UNKNOWN, limit_entry(None, max(1, math.ceil(unknown_per_second * window)), window))]
    notes = {UNKNOWN: "requests with an unknown key or none"}
    for tenant in sorted(tenants):
        requests = _requests(resolved, tenant, window)
        if requests is None:
            continue
        token = tenant_token(tenant)
        limits.append((token, limit_entry(tenant, requests, window)))
        notes[token] = f"tenant {json.dumps(tenant)}: {requests} requests in {window} s"
    return Maps(sorted(key_entries), limits, notes)


def registry_maps(registry: Registry, window: int, unknown_per_second: float) -> tuple[int | None, Maps]:
    """The current deployment's generation (None: nothing deployed) and the maps it and keys.toml give."""
    store = DeploymentStore(registry)
    generation = store.current_generation()
    quotas = store.read(generation).quotas if generation is not None else []
    keys = read_keys(keys_path(registry.root)).keys
    return generation, render_maps(quotas, keys, window, unknown_per_second)


# -- the configuration ---------------------------------------------------------------------------

CONFIG_TEMPLATE = """\
# Written by `muse edge render` (muse/server/edge.py); `muse edge sync` keeps the maps current.
global
    stats socket {socket} mode 600 level admin
    log stdout format raw local0 notice
    # no maxconn: HAProxy sizes it from the process's limit on open files

defaults
    mode http
    log global
    option dontlognull
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout queue 5s
    timeout check 1s

frontend muse
    bind {bind}
    option dontlog-normal
    option forwardfor
    # The credential, as the server reads it (server/auth.py): Authorization: Bearer <key>, else
    # X-API-Key; the key without the blanks at either end (Python's bytes.strip).
    acl has_authorization req.hdr_cnt(authorization) gt 0
    http-request set-var(txn.key) req.fhdr(authorization),regsub('^bearer ','',i) if has_authorization
    http-request set-var(txn.key) req.fhdr(x-api-key) unless has_authorization
    http-request set-var(txn.key) var(txn.key),regsub('^[[:space:]]+',''),regsub('[[:space:]]+$','')
    # Its tenant from sha256 of the secret: what follows muse_<id>_ (the secret itself may hold '_').
    acl muse_key var(txn.key) -m reg ^muse_[^_]*_
    http-request set-var(txn.secret) var(txn.key),regsub('^muse_[^_]*_','') if muse_key
    http-request set-var(txn.who) var(txn.secret),sha2(256),hex,lower,map({keys_map},{unknown}) if muse_key
    http-request set-var(txn.who) str({unknown}) unless muse_key
    # REQUESTS:RETRY_AFTER:BODY of a limited tenant; a tenant absent from limits.map is not limited.
    http-request set-var(txn.limit) var(txn.who),map({limits_map})
    acl limited var(txn.limit) -m found
    # Admitted requests only: the count goes up after the check, so refusals cost no budget.
    http-request track-sc0 var(txn.who) table tenants if limited
    http-request set-var(txn.admitted) sc0_gpc0_rate if limited
    http-request set-var(txn.room) var(txn.limit),field(1,:),sub(txn.admitted) if limited
    acl full var(txn.room) -m int le 0
    http-request set-var(txn.wait) var(txn.limit),field(2,:) if limited full
    http-request set-var(txn.body) var(txn.limit),field(3,:),b64dec if limited full
    http-request return status 429 content-type application/json hdr Retry-After %[var(txn.wait)] {body} if limited full
    http-request sc-inc-gpc0(0) if limited
    default_backend muse

backend muse
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    # A request that never reached a server (refused, or closed unanswered) goes to another one.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    default-server check inter 500ms fastinter 250ms downinter 500ms rise 2 fall 2
{servers}

backend tenants
    # gpc0: requests admitted; its rate over the window is what the limit holds.
    stick-table type string len 32 size 1m expire {expire}s store gpc0,gpc0_rate({window}s)
"""


def render(
    registry: Registry | str | pathlib.Path,
    out: str | pathlib.Path,
    backends: Sequence[str],
    bind: str,
    window: int = DEFAULT_WINDOW,
    unknown_per_second: float = DEFAULT_UNKNOWN_PER_SECOND,
    socket_path: str | pathlib.Path | None = None,
) -> pathlib.Path:
    """Write OUT/haproxy.cfg, its maps (from ``registry``'s current deployment and keys) and
    OUT/edge.json; returns the configuration's path."""
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    if not reg.root.is_dir():
        raise ValueError(f"--registry {reg.root}: no such directory")
    if not backends:
        raise ValueError("--backend: give at least one HOST:PORT of `muse serve`")
    servers = [host_port("--backend", b) for b in backends]
    host_port("--bind", bind)
    if not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"--window {window}s: give 1s to {MAX_WINDOW}s (e.g. 10s)")
    if not (math.isfinite(unknown_per_second) and unknown_per_second > 0):
        raise ValueError(f"--unknown-per-second {unknown_per_second}: give a number > 0")
    directory = safe_path("--out", pathlib.Path(out))
    sock = safe_path("--socket", pathlib.Path(socket_path) if socket_path else directory / SOCKET)
    if len(str(sock).encode()) > _SOCKET_PATH_MAX:
        raise ValueError(
            f"--socket {sock}: a unix socket's path is at most {_SOCKET_PATH_MAX} bytes; give a shorter one"
        )
    _, maps = registry_maps(reg, window, unknown_per_second)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in maps.files().items():
        write_atomic(directory / name, data)
    settings = EdgeSettings(bind, window, unknown_per_second, str(sock), str(directory))
    write_atomic(directory / SETTINGS, msgspec.json.format(msgspec.json.encode(settings)) + b"\n")
    config = CONFIG_TEMPLATE.format(
        socket=sock,
        bind=bind,
        keys_map=directory / KEYS_MAP,
        limits_map=directory / LIMITS_MAP,
        unknown=UNKNOWN,
        body="lf-string %[var(txn.body)]",
        servers="\n".join(f"    server s{i} {b}" for i, b in enumerate(servers, 1)),
        window=window,
        expire=2 * window,  # an idle tenant's entry outlives its rate's window, then goes
    )
    return write_atomic(directory / CONFIG, config.encode())


def read_settings(out: str | pathlib.Path) -> EdgeSettings:
    path = pathlib.Path(out) / SETTINGS
    try:
        return msgspec.json.decode(path.read_bytes(), type=EdgeSettings)
    except FileNotFoundError:
        raise ValueError(f"--out {out}: no {SETTINGS}; write the edge there first with `muse edge render`") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"{path}: {exc}; render the edge again with `muse edge render`") from None


def find_haproxy() -> str | None:
    """HAProxy's binary (Debian installs it in /usr/sbin, outside a user's PATH), or None."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/local/sbin:/usr/sbin")


def haproxy_binary() -> str:
    binary = find_haproxy()
    if binary is None:
        raise ValueError("haproxy is not installed (Debian: apt-get install haproxy; 2.6 or later)")
    return binary


def check_config(config: str | pathlib.Path, binary: str | None = None) -> None:
    """`haproxy -c`: ValueError with HAProxy's complaint if it refuses ``config``."""
    check = subprocess.run([binary or haproxy_binary(), "-c", "-q", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ValueError(f"{config}: haproxy -c refused it: {(check.stdout + check.stderr).strip()}")


# -- the runtime API -----------------------------------------------------------------------------


def runtime(socket_path: str | pathlib.Path, command: str, timeout: float = 5.0) -> str:
    """One command on HAProxy's runtime API; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        s.sendall(command.encode())
        chunks = []
        while chunk := s.recv(65536):  # it closes the connection after answering
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def replace_map(socket_path: str | pathlib.Path, map_path: pathlib.Path, entries: Entries) -> None:
    """``map_path``'s entries in the running HAProxy replaced by ``entries``, all at once: a new
    version is filled, then committed (requests see the old map or the new, never a mix)."""
    answer = runtime(socket_path, f"prepare map {map_path}\n")
    version = re.match(r"New version created: ([0-9]+)", answer)
    if version is None:
        raise EdgeError(f"{socket_path}: prepare map {map_path}: {answer.strip()}")
    at = f"@{version.group(1)}"
    for batch in _batches([f"{k} {v}\n" for k, v in entries], PAYLOAD_BYTES):
        answer = runtime(socket_path, f"add map {at} {map_path} <<\n{batch}\n")
        if answer.strip():
            raise EdgeError(f"{socket_path}: add map {at} {map_path}: {answer.strip()}")
    answer = runtime(socket_path, f"commit map {at} {map_path}\n")
    if answer.strip():
        raise EdgeError(f"{socket_path}: commit map {at} {map_path}: {answer.strip()}")


def _batches(lines: list[str], limit: int) -> Iterator[str]:
    """``lines`` joined into runs of at most ``limit`` characters (a longer line alone)."""
    batch: list[str] = []
    size = 0
    for line in lines:
        if batch and size + len(line) > limit:
            yield "".join(batch)
            batch, size = [], 0
        batch.append(line)
        size += len(line)
    if batch:
        yield "".join(batch)


def apply(settings: EdgeSettings, maps: Maps) -> None:
    """Write the map files (a restart starts from them), then replace them in the running HAProxy:
    limits first, so a new tenant's limit is there before its keys."""
    out = pathlib.Path(settings.directory)
    for name, data in maps.files().items():
        write_atomic(out / name, data)
    replace_map(settings.socket, out / LIMITS_MAP, maps.limits)
    replace_map(settings.socket, out / KEYS_MAP, maps.keys)


# -- following the registry ----------------------------------------------------------------------


class EdgeSync:
    """Keeps a running HAProxy's maps (and OUT's map files) those of ``registry``'s current
    deployment and keys.toml.  ``sync()`` is one pass; ``run()`` polls until ``stop``."""

    def __init__(self, registry: Registry, out: str | pathlib.Path, socket_path: str | pathlib.Path | None = None):
        self.registry = registry
        settings = read_settings(out)  # its directory is the one render wrote into haproxy.cfg
        self.settings = msgspec.structs.replace(settings, socket=str(socket_path or settings.socket))
        self._seen: tuple[object, ...] | None = None  # what the registry's files were at the last pass that applied
        self._applied: Maps | None = None

    def _state(self) -> tuple[object, ...]:
        """What changes when a deployment is published or keys.toml is written."""
        try:
            current = DeploymentStore(self.registry).current_path.read_bytes()
        except FileNotFoundError:
            current = None
        try:
            st = keys_path(self.registry.root).stat()
            keys: tuple[int, ...] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            keys = None
        return current, keys

    def sync(self) -> bool:
        """One pass: apply the registry's maps if they changed since the last pass that applied
        (the first pass always applies: the running HAProxy may hold anything).  True if it did."""
        state = self._state()
        if state == self._seen:
            return False
        generation, maps = registry_maps(self.registry, self.settings.window, self.settings.unknown_per_second)
        if maps == self._applied:
            self._seen = state
            return False
        apply(self.settings, maps)
        self._seen, self._applied = state, maps
        limited = len(maps.limits) - 1
        log.info(
            "edge maps applied: generation %s, %d keys, %d tenants limited",
            generation,
            len(maps.keys),
            limited,
            extra={"event": "edge_synced", "generation": generation},
        )
        return True

    def run(self, stop: threading.Event, interval: float = POLL_SECONDS) -> None:
        """Until ``stop``: a pass every ``interval``; a failing one (the registry mid-change or
        unreadable, HAProxy restarting) is said once and retried, backing off up to BACKOFF_MAX."""
        mirror = self.registry.mirror
        if mirror is not None:  # a registry at a URL: follow the store into the mirror, as replicas do
            follow_in_background(mirror, stop, interval, log, "edge", "muse-edge-follow")
        outage = Outage(
            log, f"applying {self.registry.root}'s quotas and keys to HAProxy at {self.settings.socket}", "edge"
        )
        failures = 0
        while True:
            try:
                self.sync()
                outage.ok()
                failures = 0
            except (OSError, ValueError, EdgeError) as exc:  # SpecError is a ValueError
                self._seen = None  # try the whole pass again
                failures += 1
                outage.failed(exc)
            if stop.wait(min(BACKOFF_MAX, interval * 2 ** min(failures, 8))):
                return


# -- HAProxy as a child process (tests, benchmarks) ----------------------------------------------


class Edge:
    """HAProxy on a configuration `render` wrote, in the foreground (-db) as a child process,
    its output in DIR/haproxy.log; live (its runtime API answering) when constructed."""

    def __init__(self, config: str | pathlib.Path, binary: str | None = None, timeout: float = 30):
        from .testing import wait_until

        self.config = pathlib.Path(config)
        self.settings = read_settings(self.config.parent)
        self.port = int(self.settings.bind.rsplit(":", 1)[1])
        binary = binary or haproxy_binary()
        check_config(self.config, binary)
        self.log_path = self.config.parent / "haproxy.log"
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdout=out, stderr=subprocess.STDOUT)

        def answering() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with status {self.proc.returncode}: {self.output()}")
            try:
                return "Pid:" in runtime(self.settings.socket, "show info\n", timeout=1)
            except OSError:
                return False

        try:
            wait_until(answering, timeout, f"haproxy's runtime API at {self.settings.socket}", 0.02)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Edge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        from .testing import stop_process

        if self.proc.poll() is None:
            stop_process(self.proc, 10)
