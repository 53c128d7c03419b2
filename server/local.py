"""A MUSE server on this machine, seen from outside: a free loopback port, waiting
for readiness, and reading /metrics.  The demo, the benchmarks and the tests all
start servers this way; nothing here runs inside one."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_for(port: int, path: str = "/v2/health/ready", generation: int | None = None, timeout: float = 60,
             process: subprocess.Popen | None = None) -> None:
    """Until ``path`` answers 200 (for ``generation``, if given); fails early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it was ready")
        try:
            status, body = get(port, path, timeout=2)
            if status == 200 and (generation is None or json.loads(body)["generation"] == generation):
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.05)
    raise TimeoutError(f"the server on port {port} did not serve generation {generation or 'any'} "
                       f"within {timeout:.0f} s")


def scrape(port: int) -> dict[str, float]:
    """/metrics as {'name{label="value",...}': value}, labels sorted by name."""
    _, raw = get(port, "/metrics")
    samples = {}
    for family in text_string_to_metric_families(raw.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples
