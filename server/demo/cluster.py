"""`muse demo-cluster`: three replicas of `muse serve` behind HAProxy, on one registry in
object storage (moto's S3 server on loopback), and what an update looks like from outside.

It builds a small calibrated registry on the store from scratch (the pieces of `muse demo`,
smaller), starts the replicas (each a host of its own: its own cache, so its own mirror, and
replica id) and HAProxy in front, then, with clients scoring through HAProxy throughout,
deploys generation 1, promotes a second predictor (2) and rolls back (3), timing each
replica's switch from its own /v2/health/ready.  Then it kills one replica with SIGKILL,
publishes while it is down and restarts it; measures what the replicas ask of the store while
idle (moto's request recorder, by each replica's access key); and, after stopping them with
SIGTERM, counts the score-log rows each uploaded.  WORKDIR/result.json holds the outcome (a
`ClusterResult`); the exit status is 1 if a request failed during the update story or a
replica did not converge.

Without HAProxy (not installed) the clients go round robin over the replicas themselves, and
the output says so.  The pieces (`Replica`, `HAProxy`, `Load`, `converge`) are also what
tests/test_cluster.py runs."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import http.client
import io
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from unittest import mock

import msgspec
import polars as pl

from muse.calib import ReferenceFile
from muse.calib.reference import encode_reference
from muse.calib.samples import query_score_log
from muse.core.registry import Registry
from muse.core.remote import Mirror
from muse.server import testing
from muse.server.edge import check_config, find_haproxy

REPLICAS = ("r1", "r2", "r3")
VICTIM = "r2"  # the replica the demo kills
CONVERGE_TIMEOUT = 30.0  # seconds; a replica slower than this has not converged
BUCKET = "muse-cluster"
MARKER = ".muse-demo-cluster"  # marks a workdir this demo made (and may empty)

HAPROXY_CONFIG = """\
# Written by muse demo-cluster (server/demo/cluster.py).
global
    log stdout format raw local0 info
    maxconn 4096

defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 30s
    timeout server 5s
    timeout http-request 10s
    timeout queue 5s
    timeout check 1s

frontend muse
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    # A request whose replica refused the connection, closed it without answering (killed, or
    # an idle keep-alive connection it had just closed) or did not answer in time is sent again,
    # up to 3 times, each time to another replica (redispatch 1: on every retry, not only the last).
    # Scoring the same events twice is harmless, but the score log may then hold them twice.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
    http-response set-header X-Muse-Replica %s
    default-server check inter 500ms fastinter 250ms downinter 500ms rise 2 fall 2
{servers}

listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


# -- the pieces ---------------------------------------------------------------------------------


def ready_generation(port: int) -> int | None:
    """The generation the server on ``port`` serves (its /v2/health/ready); None when it is not
    ready or not answering."""
    try:
        status, body, _ = testing.request(port, "GET", "/v2/health/ready", timeout=1)
    except (OSError, http.client.HTTPException):
        return None
    return int(body["generation"]) if status == 200 and isinstance(body, dict) else None


class Replica:
    """`muse serve --registry URL` as one host of a cluster: its own cache (MUSE_CACHE_DIR, so its
    own mirror), replica id and port, kept across restarts; output to WORK/replica-ID.log.

    It runs in a session of its own, so that ``kill`` can end it as a host's or a pod's death
    does: the whole process group at once (its workers would also stop on their own once their
    parent is gone, server/app.py, but not in the same instant)."""

    def __init__(self, rid: str, url: str, work: pathlib.Path, env: Mapping[str, str], *flags: str):
        self.rid = rid
        self.url = url
        self.port = testing.free_port()
        self.cache = work / f"host-{rid}"
        self.log_path = work / f"replica-{rid}.log"
        self.env = {**os.environ, **env, "MUSE_CACHE_DIR": str(self.cache), "PYTHONUNBUFFERED": "1"}
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None
        self._ended = True  # its session is signalled once per start

    def start(self) -> Replica:
        command = [sys.executable, "-m", "muse.server.cli", "serve", "--registry", self.url]
        command += ["--port", str(self.port), "--workers", "1", "--replica-id", self.rid, *self.flags]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self._ended = False
        return self

    @property
    def alive(self) -> bool:
        if self.proc is None:
            return False
        if self.proc.poll() is None:
            return True
        if not self._ended:
            self._end_session()  # the main process died alone: its workers go too
        return False

    def wait_live(self, timeout: float = 90) -> None:
        """Until it answers /v2/health/live (ready or not: nothing may be deployed yet)."""
        try:
            testing.wait_for(self.port, "/v2/health/live", timeout=timeout, process=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"replica {self.rid}: {exc}: {self.output()}") from None

    def generation(self) -> int | None:
        return ready_generation(self.port)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL to every process of the replica: nothing flushed, nothing uploaded."""
        if self.proc is not None and not self._ended:
            self._end_session()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (the workers flush their score log, the replica uploads it), SIGKILL after 30 s."""
        if self.proc is None or self._ended:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        self._end_session()
        self.proc.wait()

    def _end_session(self) -> None:
        """SIGKILL to its session: the main process if still there, and any worker it left
        behind.  Once per start, so that the group's number, once free, is never signalled."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._ended = True


def stop_all(replicas: Sequence[Replica]) -> None:
    """Stop ``replicas`` (SIGTERM) at once: each flushes and uploads its score log meanwhile."""
    threads = [threading.Thread(target=r.stop) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def converge(ports: Mapping[str, int], generation: int, since: float, timeout: float = CONVERGE_TIMEOUT) -> dict:
    """Seconds from ``since`` (time.monotonic()) until each server (name -> port) first answers
    /v2/health/ready with ``generation`` or a later one, polled every 10 ms from a thread per
    server; None for one that has not after ``timeout``."""
    seen: dict[str, float | None] = {}

    def watch(name: str, port: int) -> None:
        while time.monotonic() < since + timeout:
            g = ready_generation(port)
            if g is not None and g >= generation:
                seen[name] = time.monotonic() - since
                return
            time.sleep(0.01)
        seen[name] = None

    threads = [threading.Thread(target=watch, args=item, daemon=True) for item in ports.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {name: seen[name] for name in ports}


class HAProxy:
    """HAProxy in front of ``replicas`` (name -> port), in the foreground (-db) as a child
    process; its configuration in WORK/haproxy.cfg, its log (server state changes) in
    WORK/haproxy.log, its statistics (CSV) on a port of their own."""

    def __init__(self, binary: str, replicas: Mapping[str, int], work: pathlib.Path):
        self.port, self.stats_port = testing.free_port(), testing.free_port()
        self.names = list(replicas)
        servers = "\n".join(f"    server {name} 127.0.0.1:{port}" for name, port in replicas.items())
        self.config = work / "haproxy.cfg"
        self.config.write_text(HAPROXY_CONFIG.format(port=self.port, stats_port=self.stats_port, servers=servers))
        check_config(self.config, binary)
        self.log_path = work / "haproxy.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            testing.wait_answering(self.proc, self.stats_port, "/stats;csv", 200, f"haproxy (log: {self.log_path})", 30)
        except BaseException:
            testing.stop_process(self.proc, 5)
            raise

    def stats(self) -> dict[str, dict[str, str]]:
        """The backend's rows of HAProxy's statistics, by server name (and BACKEND)."""
        _, raw, _ = testing.request(self.stats_port, "GET", "/stats;csv", timeout=2)
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "replicas"}

    def status(self) -> dict[str, str]:
        """Each server's state as HAProxy's health checks see it: UP, DOWN, 'UP 1/2' (going down)..."""
        stats = self.stats()
        return {name: stats[name]["status"] for name in self.names}

    def wait_status(self, names: Sequence[str], status: str, timeout: float = 30) -> float:
        """Until HAProxy holds each of ``names`` ``status`` (UP: with its last check passed);
        returns the seconds it took."""
        start = time.monotonic()

        def reached() -> bool:
            stats = self.stats()
            return all(
                stats[n]["status"] == status and (status != "UP" or stats[n]["check_status"] == "L7OK") for n in names
            )

        testing.wait_until(reached, timeout, f"haproxy to see {', '.join(names)} {status}", 0.05)
        return time.monotonic() - start

    def retries(self) -> tuple[int, int]:
        """(retries, redispatches) of the backend so far."""
        backend = self.stats()["BACKEND"]
        return int(backend["wretr"] or 0), int(backend["wredis"] or 0)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        testing.stop_process(self.proc, 10)


@dataclasses.dataclass
class Phase:
    """What the clients saw during one phase of the story."""

    requests: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)  # one line per failed request
    by_replica: dict[str, int] = dataclasses.field(default_factory=dict)  # requests answered
    by_predictor: dict[str, int] = dataclasses.field(default_factory=dict)
    events: dict[str, int] = dataclasses.field(default_factory=dict)  # events answered, per replica
    retried: int = 0  # client round robin only: requests sent again to the next replica


class Load:
    """Client threads sending scoring requests at a steady rate, over keep-alive connections:
    to one load balancer (``targets`` = {"haproxy": port}), whose X-Muse-Replica header names
    the replica that answered, or round robin over the replicas (name -> port), a connection
    error sent once more to the next one, as a client with a list of hosts would.

    ``bodies``: (JSON body, headers, events) taken in turn.  A request fails when it is not
    answered 200 (a connection error included); counts go to the phase current when it ends."""

    def __init__(
        self,
        targets: Mapping[str, int],
        bodies: Sequence[tuple[bytes, Mapping[str, str], int]],
        clients: int = 4,
        rate: float = 25.0,
    ):
        self.targets = dict(targets)
        self.bodies = list(bodies)
        self.clients = clients
        self.rate = rate
        self.phases: dict[str, Phase] = {}
        self.current = self.phase("start")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def phase(self, name: str) -> Phase:
        """Count from now on in phase ``name`` (made if new); returns it."""
        self.current = self.phases.setdefault(name, Phase())
        return self.current

    def total(self, names: Sequence[str]) -> Phase:
        """The phases ``names`` added up."""
        out = Phase()
        with self._lock:
            for p in (self.phases[n] for n in names if n in self.phases):
                out.requests += p.requests
                out.failures += p.failures
                out.retried += p.retried
                for mine, theirs in (
                    (out.by_replica, p.by_replica),
                    (out.by_predictor, p.by_predictor),
                    (out.events, p.events),
                ):
                    for k, v in theirs.items():
                        mine[k] = mine.get(k, 0) + v
        return out

    def wait_answered(
        self, phase: Phase, count: int, predictor: str | None = None, replica: str | None = None, timeout: float = 30
    ) -> None:
        """Until ``count`` requests of ``phase`` were answered (by ``predictor``, by ``replica``)."""

        def answered() -> bool:
            with self._lock:
                if predictor is not None:
                    return phase.by_predictor.get(predictor, 0) >= count
                if replica is not None:
                    return phase.by_replica.get(replica, 0) >= count
                return sum(phase.by_replica.values()) >= count

        what = (
            f"{count} requests answered"
            + (f" by {predictor}" if predictor else "")
            + (f" by {replica}" if replica else "")
        )
        testing.wait_until(answered, timeout, what)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join()

    def _client(self, index: int) -> None:
        conns: dict[str, http.client.HTTPConnection] = {}
        names = list(self.targets)
        next_at = time.monotonic()
        try:
            for n in itertools.count(index * 7919):
                if self._stop.is_set():
                    return
                body, headers, events = self.bodies[n % len(self.bodies)]
                tries = [names[(n + k) % len(names)] for k in range(min(2, len(names)))]
                answered: tuple[str, int, bytes, str] | None = None
                error = ""
                for attempt, name in enumerate(tries):
                    try:
                        answered = (name, *self._post(conns, name, body, headers))
                        break
                    except (OSError, http.client.HTTPException) as exc:
                        conns.pop(name).close()
                        error = f"{name}: {type(exc).__name__}: {exc}"
                        if attempt + 1 < len(tries):
                            with self._lock:
                                self.current.retried += 1
                self._record(answered, error, events)
                next_at = max(next_at + 1 / self.rate, time.monotonic() - 1.0)
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            for conn in conns.values():
                conn.close()

    def _post(
        self, conns: dict[str, http.client.HTTPConnection], name: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, bytes, str]:
        if name not in conns:
            conns[name] = http.client.HTTPConnection("127.0.0.1", self.targets[name], timeout=30)
        conn = conns[name]
        conn.request("POST", "/v1/score", body=body, headers=dict(headers))
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("x-muse-replica") or name

    def _record(self, answered: tuple[str, int, bytes, str] | None, error: str, events: int) -> None:
        with self._lock:
            phase = self.current
            phase.requests += 1
            if answered is None:
                phase.failures.append(error)
                return
            name, status, raw, replica = answered
            if status != 200:
                phase.failures.append(f"{name}: {status} {raw[:200].decode(errors='replace')}")
                return
            try:
                predictor = str(json.loads(raw)["predictor"])
            except (ValueError, KeyError, TypeError):
                predictor = "?"
            phase.by_replica[replica] = phase.by_replica.get(replica, 0) + 1
            phase.by_predictor[predictor] = phase.by_predictor.get(predictor, 0) + 1
            phase.events[replica] = phase.events.get(replica, 0) + events


def store_requests(s3: testing.S3Server, seconds: float) -> dict[str, dict[str, int]]:
    """The requests moto's S3 server receives over the next ``seconds``, by the access key that
    signed them (each replica has its own) and by kind: `current` polls, keys.toml polls,
    score-log uploads, listings, other.  From moto's request recorder (its server must have
    been started with MOTO_RECORDER_FILEPATH set, or it records into its working directory)."""
    api = "/moto-api/recorder/"
    for call in ("reset-recording", "start-recording"):
        testing.request(s3.port, "POST", api + call)
    time.sleep(seconds)  # a measurement window, not a wait for a state
    testing.request(s3.port, "POST", api + "stop-recording")
    _, raw, _ = testing.request(s3.port, "GET", api + "download-recording")
    counts: dict[str, dict[str, int]] = {}
    for line in (raw.decode() if isinstance(raw, bytes) else str(raw)).splitlines():
        entry = json.loads(line)
        found = re.search(r"Credential=([^/]+)/", entry["headers"].get("Authorization", ""))
        who = found.group(1) if found else "unsigned"
        url = urllib.parse.urlsplit(entry["url"])
        if url.path.endswith("/deployments/current"):
            kind = "current"
        elif url.path.endswith("/keys.toml"):
            kind = "keys.toml"
        elif "/scorelog/" in url.path:
            kind = "score-log upload"
        elif "list-type" in url.query:
            kind = "list"
        else:
            kind = "other"
        mine = counts.setdefault(who, {})
        mine[kind] = mine.get(kind, 0) + 1
    return counts


def score_log_rows(url: str, replica: str) -> int:
    """Rows of the score log ``replica`` uploaded to the registry at ``url``."""
    frame = query_score_log(f"{url}/scorelog/replica={replica}", lambda scan: scan.select(pl.len()))
    return 0 if frame is None else int(frame.item())


# -- the demo -----------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationResult:
    generation: int
    change: str  # the command that published it
    seconds: dict[str, float | None]  # per replica, from the command's return to serving it; None: never


@dataclasses.dataclass
class ClusterResult:
    """What `muse demo-cluster` shows, as data: WORKDIR/result.json."""

    balancer: str  # "HAProxy", or "client-side round robin" when HAProxy is not installed
    generations: list[GenerationResult]
    story_requests: int  # through the balancer while generations 1-3 were deployed, promoted, rolled back
    story_failures: list[str]
    story_answered_by: dict[str, dict[str, int]]  # phase -> predictor -> requests
    story_by_replica: dict[str, int]
    killed: str = ""
    kill_requests: int = 0  # from the SIGKILL until the restarted replica answered again
    kill_failures: list[str] = dataclasses.field(default_factory=list)
    kill_retries: int = 0  # HAProxy's retries meanwhile (or the clients', without it)
    kill_redispatches: int = 0
    marked_down_seconds: float | None = None  # SIGKILL -> HAProxy holds it DOWN
    restart_ready_seconds: float | None = None  # restart -> /v2/health/ready answers
    restart_first_generation: int | None = None  # the generation it first answered ready with
    current_generation: int = 0
    rejoined_seconds: float | None = None  # restart -> HAProxy holds it UP
    served_after_rejoin: int = 0
    idle_seconds: float = 0.0
    store_requests: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # replica -> kind -> n
    poll_rate: dict[str, float] = dataclasses.field(default_factory=dict)  # replica -> `current`+keys requests/s
    events_answered: dict[str, int] = dataclasses.field(default_factory=dict)  # per replica, whole run
    score_log_rows: dict[str, int] = dataclasses.field(default_factory=dict)  # uploaded, per replica
    seconds: float = 0.0

    def converged(self) -> bool:
        return all(s is not None for g in self.generations for s in g.seconds.values())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo-cluster",
        help="three replicas behind HAProxy on a registry in (local, simulated) S3: updates under load",
    )
    p.add_argument("--workdir", default="demo-cluster-out", type=pathlib.Path)
    p.add_argument("--rows", type=int, default=5000, help="events per tenant per month of the training data")
    p.add_argument("--trees", type=int, default=60, help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, default=4, help="client threads scoring throughout")
    p.add_argument("--rate", type=float, default=25.0, help="requests per second per client")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="how long the store's requests are counted")
    p.add_argument("--no-haproxy", action="store_true", help="round robin in the clients even if HAProxy is there")
    p.set_defaults(func=cmd_demo_cluster)


def cmd_demo_cluster(args: argparse.Namespace) -> int:
    work: pathlib.Path = args.workdir.resolve()
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise ValueError(f"{work} is not empty and not a demo-cluster workdir: choose another --workdir")
        shutil.rmtree(work)  # the previous run's
    work.mkdir(parents=True)
    (work / MARKER).touch()
    haproxy = None if args.no_haproxy else find_haproxy()
    result = run_cluster(work, args.rows, args.trees, args.clients, args.rate, args.idle_seconds, haproxy)
    (work / "result.json").write_bytes(msgspec.json.format(msgspec.json.encode(result)))
    code = 0
    if result.story_failures:
        print(
            f"\ndemo-cluster: {len(result.story_failures)} requests failed during the updates, the first: "
            f"{result.story_failures[0]}"
        )
        code = 1
    if not result.converged():
        print(f"\ndemo-cluster: a replica did not serve a generation within {CONVERGE_TIMEOUT:.0f} s")
        code = 1
    if result.restart_first_generation != result.current_generation:
        print(
            f"\ndemo-cluster: the restarted replica first served generation {result.restart_first_generation}, "
            f"not the current {result.current_generation}"
        )
        code = 1
    return code


def run_cluster(
    work: pathlib.Path, rows: int, trees: int, clients: int, rate: float, idle: float, haproxy: str | None
) -> ClusterResult:
    from . import step

    t0 = time.perf_counter()
    step("1. Object storage: moto's S3 server on loopback (a stand-in for S3 or an S3-compatible store)")
    with mock.patch.dict(os.environ, MOTO_RECORDER_FILEPATH=str(work / "moto-recording.jsonl")):
        s3 = testing.S3Server(work / "moto.log")
    try:
        url = s3.bucket(BUCKET) + "/registry"
        print(f"{s3.endpoint}: bucket {BUCKET}; the registry is {url}")
        # This process is the operator's host: its mirror of the registry is in WORK/host-admin.
        with mock.patch.dict(os.environ, **s3.env, MUSE_CACHE_DIR=str(work / "host-admin")):
            keys = build(work, url, rows, trees)
            result = serve(work, url, s3, keys, clients, rate, idle, haproxy)
    finally:
        s3.stop()
    result.seconds = time.perf_counter() - t0
    summary(result)
    print(f"\ndemo-cluster finished in {result.seconds:.0f} s; files in {work}; results in {work / 'result.json'}")
    return result


def build(work: pathlib.Path, url: str, rows: int, trees: int) -> dict[str, str]:
    """The registry of `muse demo`, smaller, built on the store: two models, their calibrations
    (the second fitted offline, not from shadow traffic), the references, a key per tenant."""
    from . import BETA_V1, BETA_V2, REFERENCE, REVIEW, TENANTS, q, run, step, train_model

    step(f"2. Build a registry on {url}, as an operator's host does (its mirror: {work / 'host-admin'})")
    train_model([0, 1, 2], rows, work / "fraud_v1.txt", seed=1, beta=BETA_V1, trees=trees)
    run(f"compile {q(work / 'fraud_v1.txt')} --registry {url} --name fraud --beta {BETA_V1}")
    mirror = Mirror.open(url)
    reg = Registry(mirror.root)
    reg.references_dir.mkdir(parents=True, exist_ok=True)
    reg.reference_path("fraud").write_bytes(encode_reference(ReferenceFile("fraud", REFERENCE, "card fraud")))
    reg.reference_path("review").write_bytes(encode_reference(ReferenceFile("review", REVIEW, "manual review")))
    print(f"references fraud and review written into the mirror, then uploaded: {mirror.push()} files")
    calibrate(work, url, mirror, "fraud/1", month=3, rows=rows, names=("fraud", "fraud-review"))
    train_model([3, 4], rows, work / "fraud_v2.txt", seed=2, beta=BETA_V2, trees=trees)
    run(f"compile {q(work / 'fraud_v2.txt')} --registry {url} --name fraud --beta {BETA_V2}")
    calibrate(work, url, mirror, "fraud/2", month=5, rows=rows, names=("fraud",))
    return {t: run(f"keys add --registry {url} --tenant {t}", quiet=True).split()[-1] for t in TENANTS}


def calibrate(
    work: pathlib.Path, url: str, mirror: Mirror, model: str, month: int, rows: int, names: Sequence[str]
) -> None:
    """Fit ``model``'s maps per tenant on a month of its margins, as calibrations ``names``
    (fraud onto reference fraud, fraud-review onto review)."""
    from . import q, run, traffic

    X, _, tenants = traffic.generate_mix(month, rows, seed=7 + month)
    margins = Registry(mirror.root).load_model(model).predict(X, margin=True)
    scores = work / f"month{month}-{model.replace('/', '-')}.parquet"
    pl.DataFrame({"tenant": tenants, "margin": margins}).write_parquet(scores)
    for name in names:
        ref = "review" if name == "fraud-review" else "fraud"
        out = run(
            f"calib fit --registry {url} --model {model} --reference {ref} --name {name} "
            f"--scores {q(scores)} --by tenant",
            quiet=True,
        )
        print(out.strip().splitlines()[0] if out.strip() else "")


def bodies(keys: Mapping[str, str], batch: int = 16) -> list[tuple[bytes, dict[str, str], int]]:
    """Requests of ``batch`` month-6 events per tenant, in turn."""
    from . import traffic

    X, _, tenants = traffic.generate_mix(6, 40 * batch, seed=17)
    out = []
    for i in range(40):
        for tenant, key in keys.items():
            rows = testing.as_json_rows(X[tenants == tenant][i * batch : (i + 1) * batch])
            body = json.dumps({"tenant": tenant, "intent": "fraud", "events": [{"features": r} for r in rows]})
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
            out.append((body.encode(), headers, len(rows)))
    return out


def publish(command: str) -> tuple[int, float]:
    """Run ``muse COMMAND`` (which publishes a generation); (the generation, when it returned)."""
    from . import run

    out = run(command, quiet=True)
    print(out.rstrip())
    found = re.search(r"published (?:as )?generation (\d+)", out)
    if not found:
        raise SystemExit(f"demo-cluster: `muse {command}` published no generation: {out}")
    return int(found.group(1)), time.monotonic()


def show_convergence(g: GenerationResult) -> None:
    cells = [f"{rid} {'never' if s is None else f'{s:.2f} s'}" for rid, s in g.seconds.items()]
    print(f"generation {g.generation} served by each replica after: " + ", ".join(cells))


def serve(
    work: pathlib.Path,
    url: str,
    s3: testing.S3Server,
    keys: Mapping[str, str],
    clients: int,
    rate: float,
    idle: float,
    haproxy: str | None,
) -> ClusterResult:
    from . import deployments, q, step

    step("3. Three replicas follow the registry: each its own host cache, replica id and port")
    replicas = {}
    for rid in REPLICAS:
        # each replica signs with an access key of its own, so the store's requests can be told apart
        env = {**s3.env, "AWS_ACCESS_KEY_ID": f"muse-{rid}"}
        replicas[rid] = Replica(rid, url, work, env, "--score-log-flush-seconds", "1").start()
    lb: HAProxy | None = None
    load: Load | None = None
    try:
        for r in replicas.values():
            r.wait_live()
            print(
                f"$ MUSE_CACHE_DIR={q(r.cache)} muse serve --registry {url} --port {r.port} --workers 1 "
                f"--replica-id {r.rid} --score-log-flush-seconds 1   # live, not ready: nothing deployed"
            )
        ports = {rid: r.port for rid, r in replicas.items()}

        if haproxy:
            step("4. HAProxy in front: round robin, health checks on /v2/health/ready, retries to another replica")
            lb = HAProxy(haproxy, ports, work)
            print(f"$ {haproxy} -db -f {lb.config}   # listening on 127.0.0.1:{lb.port}")
            text = lb.config.read_text()
            print(text[text.index("\nbackend replicas") + 1 : text.index("listen stats")].rstrip())
            targets = {"haproxy": lb.port}
            balancer = "HAProxy"
        else:
            step("4. HAProxy is not installed: the clients go round robin over the replicas themselves")
            print(
                "(no load balancer: each request goes to the next replica; a connection error is sent once to "
                "the one after; install haproxy to see the demo as designed)"
            )
            targets = dict(ports)
            balancer = "client-side round robin"

        step("5. Generation 1: deploy v1 (active on both intents) with v2 defined, not routed")
        spec = deployments.write(
            msgspec.structs.replace(
                deployments.V2_CALIBRATED_SHADOW,
                routes=deployments.V1.routes,
                description="demo-cluster: v1 serves both intents; v2 defined, not routed",
            ),
            work / "v1.toml",
        )
        generations = []
        g, since = publish(f"deploy apply {q(spec)} --registry {url}")
        generations.append(GenerationResult(g, "deploy apply", converge(ports, g, since)))
        show_convergence(generations[-1])
        if lb is not None:
            lb.wait_status(list(ports), "UP")
            print(f"haproxy: {', '.join(f'{k} {v}' for k, v in lb.status().items())}")

        step(f"6. Clients score through {balancer} throughout: {clients} threads, {rate:.0f} requests/s each")
        load = Load(targets, bodies(keys), clients, rate)
        first = load.phase("generation 1")
        load.start()
        load.wait_answered(first, count=int(clients * rate))  # about a second of traffic
        print(f"scoring: {first.requests} requests so far, {len(first.failures)} failed")

        step("7. Promote fraud-v2 under load (generation 2), then roll back (generation 3)")
        for command, predictor in (("promote fraud-v2", "fraud-v2"), ("rollback", "fraud-v1")):
            phase = load.phase(command.split()[0])
            g, since = publish(f"{command} --registry {url}")
            generations.append(GenerationResult(g, command, converge(ports, g, since)))
            show_convergence(generations[-1])
            load.wait_answered(phase, predictor=predictor, count=int(clients * rate))
        story = load.total(["generation 1", "promote", "rollback"])
        print(
            f"through {balancer} during the story: {story.requests:,} requests, {len(story.failures)} failed; "
            + "; ".join(
                f"{name}: " + ", ".join(f"{p} {n:,}" for p, n in sorted(load.phases[name].by_predictor.items()))
                for name in ("generation 1", "promote", "rollback")
            )
        )
        result = ClusterResult(
            balancer=balancer,
            generations=generations,
            story_requests=story.requests,
            story_failures=story.failures,
            story_answered_by={n: dict(load.phases[n].by_predictor) for n in ("generation 1", "promote", "rollback")},
            story_by_replica=story.by_replica,
        )

        kill_and_restart(replicas[VICTIM], replicas, lb, load, url, result, generations)

        load.stop()
        answered = load.total(list(load.phases))
        result.events_answered = answered.events
        load = None

        step(f"10. Idle: what each replica asks of the store, counted by moto over {idle:.0f} s")
        counts = store_requests(s3, idle)
        result.idle_seconds = idle
        result.store_requests = {rid: counts.get(f"muse-{rid}", {}) for rid in REPLICAS}
        for rid, kinds in result.store_requests.items():
            polls = kinds.get("current", 0) + kinds.get("keys.toml", 0)
            result.poll_rate[rid] = polls / idle
            rest = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()) if k not in ("current", "keys.toml"))
            print(
                f"{rid}: {kinds.get('current', 0)} GETs of deployments/current and {kinds.get('keys.toml', 0)} of "
                f"keys.toml (If-None-Match) = {result.poll_rate[rid]:.2f} requests/s"
                + (f"; also {rest}" if rest else "")
            )
        others = {k: v for k, v in counts.items() if not k.startswith("muse-")}
        if others:
            print(f"(others: {others})")

        step("11. Stop the replicas (SIGTERM): each flushes its score log and uploads it before it exits")
        stop_all(list(replicas.values()))
        for rid in REPLICAS:
            result.score_log_rows[rid] = score_log_rows(url, rid)
            print(
                f"{url}/scorelog/replica={rid}/: {result.score_log_rows[rid]:,} rows; "
                f"{result.events_answered.get(rid, 0):,} events answered through {balancer}"
            )
        if result.score_log_rows[VICTIM] < result.events_answered.get(VICTIM, 0):
            print(
                f"({VICTIM}'s scores still in memory or in an unfinished file when it was killed are lost: the log "
                "is flushed every second; files it had finished went up when it started again)"
            )
        return result
    finally:
        if load is not None:
            load.stop()
        stop_all(list(replicas.values()))
        if lb is not None:
            lb.stop()


def kill_and_restart(
    victim: Replica,
    replicas: Mapping[str, Replica],
    lb: HAProxy | None,
    load: Load,
    url: str,
    result: ClusterResult,
    generations: list[GenerationResult],
) -> None:
    from . import step

    others = {rid: r.port for rid, r in replicas.items() if r is not victim}
    step(f"8. Kill {victim.rid} with SIGKILL (all its processes, as a host dies); the others carry on")
    retried = lb.retries() if lb is not None else (0, 0)
    phase = load.phase("kill")
    killed_at = time.monotonic()
    victim.kill()
    print(f"$ kill -KILL -{victim.proc.pid if victim.proc else '?'}   # {victim.rid}'s process group")
    if lb is not None:
        lb.wait_status([victim.rid], "DOWN")
        result.marked_down_seconds = time.monotonic() - killed_at
        print(
            f"HAProxy holds {victim.rid} DOWN {result.marked_down_seconds:.2f} s after the kill: "
            + ", ".join(f"{k} {v}" for k, v in lb.status().items())
        )
    load.wait_answered(phase, count=10 * load.clients)

    step(f"9. Promote fraud-v2 while {victim.rid} is down, then restart it: it starts at the current generation")
    g, since = publish(f"promote fraud-v2 --registry {url}")
    seconds = converge(others, g, since)
    generations.append(GenerationResult(g, f"promote fraud-v2 ({victim.rid} down)", seconds))
    show_convergence(generations[-1])
    result.current_generation = g
    result.killed = victim.rid
    restarted = time.monotonic()
    victim.start()
    first = testing.wait_until(victim.generation, 90, f"{victim.rid} to be ready again", 0.01)
    result.restart_ready_seconds = time.monotonic() - restarted
    result.restart_first_generation = first
    print(
        f"{victim.rid} restarted (the same cache, replica id and port): ready {result.restart_ready_seconds:.2f} s "
        f"later, first answering generation {first} (current: {g})"
    )
    if lb is not None:
        lb.wait_status([victim.rid], "UP")
        result.rejoined_seconds = time.monotonic() - restarted
        print(f"HAProxy holds it UP again {result.rejoined_seconds:.2f} s after the restart")
    back = load.phase("rejoined")
    load.wait_answered(back, replica=victim.rid, count=10)
    kill = load.total(["kill", "rejoined"])
    result.kill_requests, result.kill_failures = kill.requests, kill.failures
    result.served_after_rejoin = back.by_replica.get(victim.rid, 0)
    if lb is not None:
        now = lb.retries()
        result.kill_retries, result.kill_redispatches = now[0] - retried[0], now[1] - retried[1]
        retries = f"HAProxy retried {result.kill_retries} on the same replica, redispatched {result.kill_redispatches}"
    else:
        result.kill_retries = kill.retried
        retries = f"the clients sent {kill.retried} again to the next replica"
    print(
        f"from the kill until {victim.rid} answered again: {kill.requests:,} requests, {len(kill.failures)} failed; "
        f"{retries}; answered by " + ", ".join(f"{k} {v:,}" for k, v in sorted(kill.by_replica.items()))
    )
    for failure in kill.failures[:3]:
        print(f"  failed: {failure}")
    if lb is not None:
        changes = [line for line in lb.output().splitlines() if line.startswith(f"Server replicas/{victim.rid} is")]
        for line in changes[-4:]:
            print(f"  haproxy.log: {line.strip()[:160]}")


def summary(r: ClusterResult) -> None:
    print("\n== Summary")
    width = max(len(g.change) for g in r.generations)
    print(f"{'generation':>10}  {'change':<{width}}  " + "  ".join(f"{rid:>8}" for rid in REPLICAS))
    for g in r.generations:
        cells = []
        for rid in REPLICAS:
            if rid not in g.seconds:
                cells.append(f"{'down':>8}")
            else:
                s = g.seconds[rid]
                cells.append(f"{'never':>8}" if s is None else f"{s:>6.2f} s")
        print(f"{g.generation:>10}  {g.change:<{width}}  " + "  ".join(cells))
    print("(seconds from the command's return until the replica's /v2/health/ready answered the generation)")
    print(
        f"requests through {r.balancer} during deploy, promote and rollback: {r.story_requests:,}, "
        f"failed: {len(r.story_failures)}"
    )
    if r.killed:
        print(
            f"{r.killed} killed (SIGKILL): {r.kill_requests:,} requests until it answered again, failed: "
            f"{len(r.kill_failures)} (sent again: {r.kill_retries + r.kill_redispatches}); restarted ready in "
            f"{r.restart_ready_seconds or 0:.2f} s at generation {r.restart_first_generation} "
            f"(current {r.current_generation})"
        )
        if r.marked_down_seconds is not None and r.rejoined_seconds is not None:
            print(
                f"HAProxy held {r.killed} DOWN {r.marked_down_seconds:.2f} s after the kill, UP again "
                f"{r.rejoined_seconds:.2f} s after the restart"
            )
    print("store requests while idle, per replica: " + ", ".join(f"{k} {v:.2f}/s" for k, v in r.poll_rate.items()))
    print("score-log rows uploaded, per replica: " + ", ".join(f"{k} {v:,}" for k, v in r.score_log_rows.items()))
