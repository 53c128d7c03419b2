"""Helpers for driving MUSE from outside, as Starlette ships its TestClient:
a registry built from Structs, `muse serve` on a free loopback port with a
small HTTP client, /metrics as a dict, and an in-process ASGI client.  The
test suite, the benchmarks and the demo all use these; nothing here runs
inside a server."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from muse.calib import ModelIdentity, ReferenceFile, correct_margins, fit_quantile_map, make_calibration
from muse.calib.reference import encode_reference
from muse.core.deploy import DeploymentStore
from muse.core.registry import Registry
from muse.core.spec import DeploymentSpec

# -- a registry from Structs ------------------------------------------------------------------


def build_registry(
    root: str | pathlib.Path,
    *,
    models: Mapping[str, pathlib.Path] | None = None,
    references: Iterable[ReferenceFile] = (),
) -> Registry:
    """A registry at ``root`` whose ``models/NAME`` link to existing directories of compiled
    versions (``models``: NAME -> directory), holding ``references``."""
    reg = Registry(root)
    reg.models_dir.mkdir(parents=True, exist_ok=True)
    for name, directory in (models or {}).items():
        (reg.models_dir / name).symlink_to(pathlib.Path(directory).resolve())
    reg.references_dir.mkdir(exist_ok=True)
    for ref in references:
        reg.reference_path(ref.name).write_bytes(encode_reference(ref))
    return reg


def fit_calibration(
    reg: Registry,
    model_ref: str,
    X: np.ndarray,
    *,
    reference: str,
    name: str,
    version: str = "1",
    tenant: str | None = None,
) -> pathlib.Path:
    """Score ``X`` with the model, correct, fit a map onto the intent's reference, and save it
    as calibration NAME/VERSION (for ``tenant``, or all traffic)."""
    model = reg.load_model(model_ref)
    m = model.manifest
    ref = reg.load_reference(reference)
    corrected = correct_margins(model.predict(X, margin=True), m.beta)
    qmap = fit_quantile_map(corrected, ref.reference)
    return reg.save_calibration(
        make_calibration(
            qmap,
            name=name,
            version=version,
            model=ModelIdentity(m.name, m.version, m.library_sha256),
            reference_name=ref.name,
            reference=ref.reference,
            beta=m.beta,
            sample_size=corrected.size,
            tenant=tenant,
        )
    )


def deploy(reg: Registry, spec: DeploymentSpec) -> int:
    """Validate and publish ``spec`` as the registry's next generation."""
    return DeploymentStore(reg).apply(spec)


def as_json_rows(X: np.ndarray) -> list[list[float | None]]:
    """Rows as a JSON request carries them: NaN (missing) as null."""
    return [[None if v != v else float(v) for v in row] for row in X]


# -- a server on this machine, seen from outside -----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, Any, dict[str, str]]:
    """(status, body, headers); a JSON body comes back decoded."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        raw = resp.read()
        decoded = json.loads(raw) if resp.getheader("content-type", "").startswith("application/json") else raw
        return resp.status, decoded, dict(resp.getheaders())
    finally:
        conn.close()


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); TimeoutError naming
    ``what`` after ``timeout`` seconds.  Tests and tools wait on states, never for fixed times."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def wait_for(
    port: int,
    path: str = "/v2/health/ready",
    generation: int | None = None,
    timeout: float = 60,
    process: subprocess.Popen | None = None,
) -> None:
    """Until ``path`` answers 200 (for ``generation``, if given); fails early if ``process`` exits."""

    def ready(status: int, body: Any) -> bool:
        return status == 200 and (generation is None or body["generation"] == generation)

    what = f"the server (to serve generation {generation or 'any'})"
    wait_answering(process, port, path, ready, what, timeout)


def scrape(port: int, key: str | None = None) -> dict[str, float]:
    """/metrics as {'name{label="value",...}': value}, labels sorted by name; ``key`` for a
    server that wants a credential for them (--metrics-auth)."""
    status, raw, _ = request(port, "GET", "/metrics", headers={"authorization": f"Bearer {key}"} if key else None)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}: {raw!r}")
    samples = {}
    for family in text_string_to_metric_families(raw.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def wait_answering(
    proc: subprocess.Popen | None,
    port: int,
    path: str,
    accept: int | Callable[[int, Any], bool],
    what: str,
    timeout: float = 60,
) -> None:
    """Until GET ``path`` on ``port`` answers ``accept`` (a status, or a test of status and
    body); RuntimeError naming ``what`` if ``proc`` exits first.  For a server of a test, a
    benchmark or a demo starting up, or switching generations."""
    test = accept if callable(accept) else lambda status, body: status == accept

    def up() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            status, body, _ = request(port, "GET", path, timeout=2)
        except (OSError, http.client.HTTPException):
            return False  # not listening yet, or not yet answering whole
        return test(status, body)

    wait_until(up, timeout, f"{what} on port {port}", 0.05)


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL if ``proc`` has not exited within ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class LocalServer:
    """`muse serve --registry REGISTRY` on a free loopback port, in its own process; live when
    constructed.  Its output goes to REGISTRY/server-PORT.log (shown when it fails to start)."""

    def __init__(
        self,
        registry: pathlib.Path | str,
        *extra: str,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        log_dir: pathlib.Path | None = None,
    ):
        if log_dir is None and "://" in str(registry):
            raise ValueError(f"{registry}: a registry at a URL needs log_dir, a local folder for the server's output")
        self.port = free_port()
        self.registry = registry
        self.log_path = (log_dir or pathlib.Path(registry)) / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- open for the server's lifetime
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "muse.server.cli",
                "serve",
                "--registry",
                str(registry),
                "--port",
                str(self.port),
                "--workers",
                str(workers),
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.wait_ready(path="/v2/health/live")

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, generation: int | None = None, timeout: float = 60, path: str = "/v2/health/ready") -> None:
        try:
            wait_for(self.port, path, generation=generation, timeout=timeout, process=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}: {self.output()}") from None

    def output(self, whole: bool = False) -> str:
        """What the server printed: its last 4,000 characters, or all of it."""
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text if whole else text[-4000:]

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        return request(self.port, method, path, body, headers)

    def get(self, path: str, key: str | None = None) -> tuple[int, Any, dict[str, str]]:
        return self.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})

    def post(
        self, path: str, payload: Any, key: str | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        if key:
            h["Authorization"] = f"Bearer {key}"
        return self.request("POST", path, body, h)

    def metrics(self) -> dict[str, float]:
        return scrape(self.port)

    def stop(self) -> None:
        """SIGTERM (the server finishes and flushes), SIGKILL after 15 s."""
        stop_process(self.proc, 15)
        self._log.close()


# -- the app in this process, through ASGI -------------------------------------------------------


class ASGIClient:
    """Calls an ASGI app in this process, with no server or socket: ``async with
    ASGIClient(app)`` runs its lifespan start-up and shut-down, ``await client.request(...)``
    one request.  For tests of the app's own behaviour and in-process benchmarks."""

    def __init__(self, app: Callable[..., Any]):
        self.app = app

    async def __aenter__(self) -> ASGIClient:
        # One lifespan call for the client's life: start-up now, shut-down at exit.
        self._inbox: asyncio.Queue[dict] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict] = asyncio.Queue()
        self._lifespan = asyncio.ensure_future(self.app({"type": "lifespan"}, self._inbox.get, self._outbox.put))
        await self._inbox.put({"type": "lifespan.startup"})
        message = await self._outbox.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"start-up failed: {message.get('message')}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._lifespan

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes, dict[bytes, bytes]]:
        """(status, body, headers) of one request whose body arrives in one message."""
        raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        raw.append((b"content-length", str(len(body)).encode()))
        scope = {"type": "http", "method": method, "path": path, "headers": raw}
        start: dict = {}
        chunks: list[bytes] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        return start["status"], b"".join(chunks), dict(start.get("headers", []))


# -- an S3-compatible server on loopback -------------------------------------------------------


# moto's server answering HTTP/1.1, so that a client keeps its connection (as S3 does) and a
# benchmark measures requests rather than handshakes
MOTO_KEEP_ALIVE = (
    "import sys; from moto.moto_server.werkzeug_app import MotoRequestHandler as H; "
    "H.protocol_version = 'HTTP/1.1'; from moto.server import main; main(sys.argv[1:])"
)


class S3Server:
    """moto's S3 server (``moto[server]``, a dev dependency) on a free loopback port, in its own
    process; live when constructed.  ``env`` is what a client needs to reach it (the standard
    AWS_* variables); ``bucket(name)`` makes a bucket and returns its s3:// URL.  ``log_path``
    None: its output is dropped; ``keep_alive``: HTTP/1.1; ``environ``: the process's
    environment (default: this one's)."""

    def __init__(
        self,
        log_path: pathlib.Path | None,
        *,
        keep_alive: bool = False,
        environ: Mapping[str, str] | None = None,
    ):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }
        program = ["-c", MOTO_KEEP_ALIVE] if keep_alive else ["-m", "moto.server"]
        self._log = open(log_path, "wb") if log_path else None  # noqa: SIM115 -- open for the server's lifetime
        self.proc = subprocess.Popen(
            [sys.executable, *program, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env=None if environ is None else dict(environ),
        )
        try:
            wait_answering(self.proc, self.port, "/", 200, f"moto's S3 server (log: {log_path})")
        except BaseException:
            self.stop()
            raise

    def bucket(self, name: str) -> str:
        status, body, _ = request(self.port, "PUT", f"/{name}")
        if status != 200:
            raise RuntimeError(f"creating bucket {name} answered {status}: {body!r}")
        return f"s3://{name}"

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        stop_process(self.proc, 15)
        if self._log is not None:
            self._log.close()
