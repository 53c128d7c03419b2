"""Helpers for tests that need a real server: a registry with small models,
`muse serve` on a free loopback port, and a tiny HTTP client."""
from __future__ import annotations

import http.client
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from conftest import training_data
from muse.calib import AlertRateCurve, ModelIdentity, ReferenceFile, correct_margins, fit_quantile_map, make_calibration
from muse.calib.reference import encode_reference
from muse.core.registry import Registry
from muse.server import testing as local

CURVE = AlertRateCurve([0.2, 0.5, 0.6, 0.8], [0.70, 0.35, 0.10, 0.05])


def make_registry(root: pathlib.Path, cases: dict) -> Registry:
    """models/NAME -> the session's compiled artifacts; references fraud and risk."""
    reg = Registry(root)
    reg.models_dir.mkdir(parents=True)
    for name, case in cases.items():
        (reg.models_dir / name).symlink_to(case.artifact.parent)
    reg.references_dir.mkdir()
    for intent in ("fraud", "risk"):
        reg.reference_path(intent).write_bytes(encode_reference(ReferenceFile(intent, CURVE)))
    return reg


def calibrate(reg: Registry, model_name: str, tenants: dict[str, int], name: str | None = None) -> None:
    """An all-traffic map plus one per tenant, each fitted on its own seeded sample."""
    model = reg.load_model(model_name)
    m = model.manifest
    ident = ModelIdentity(m.name, m.version, m.library_sha256)
    ref = reg.load_reference("fraud")
    for tenant, seed in [(None, 0), *tenants.items()]:
        X, _ = training_data(rows=2000, seed=100 + seed)
        corrected = correct_margins(model.predict(X, margin=True), m.beta)
        qmap = fit_quantile_map(corrected, ref.reference)
        reg.save_calibration(make_calibration(qmap, name=name or model_name, version="1", model=ident,
                                              reference_name="fraud", reference=ref.reference, beta=m.beta,
                                              sample_size=corrected.size, tenant=tenant))


class Server:
    def __init__(self, registry: pathlib.Path, *extra: str, workers: int = 1):
        self.port = local.free_port()
        self.registry = registry
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log = open(registry / f"server-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "muse.server.cli", "serve", "--registry", str(registry), "--port", str(self.port),
             "--workers", str(workers), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        self.wait_live()

    def wait_live(self, timeout: float = 60) -> None:
        try:
            local.wait_for(self.port, "/v2/health/live", timeout=timeout, process=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}: {self.output()}") from None

    def wait_ready(self, generation: int | None = None, timeout: float = 60) -> None:
        try:
            local.wait_for(self.port, generation=generation, timeout=timeout, process=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}: {self.output()}") from None

    def output(self) -> str:
        self.log.flush()
        return (self.registry / f"server-{self.port}.log").read_text(errors="replace")[-4000:]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("content-type", "")
            return resp.status, (json.loads(raw) if ctype.startswith("application/json") else raw), dict(resp.getheaders())
        finally:
            conn.close()

    def get(self, path: str, key: str | None = None):
        return self.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})

    def post(self, path: str, payload, key: str | None = None, headers: dict | None = None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        if key:
            h["Authorization"] = f"Bearer {key}"
        return self.request("POST", path, body, h)

    def metrics(self) -> dict[str, float]:
        return local.scrape(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def rows(n: int, seed: int) -> np.ndarray:
    X, _ = training_data(rows=n, seed=seed)
    return X


def as_json_rows(X: np.ndarray) -> list[list]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in X]
