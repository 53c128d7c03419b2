"""Three replicas of `muse serve` on one registry in object storage (moto's S3 server on
loopback), each a host of its own (cache, replica id, port), behind HAProxy where it is
installed (server/demo/cluster.py): they converge on a new generation within 2 s, promote and
rollback under load fail no request, a replica killed and restarted rejoins at the current
generation, and concurrent `muse deploy apply` never share a generation number.

The replicas, the store and HAProxy are shared by the module's tests; each test starts from
every replica running and serving the store's current generation, and may publish more."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import msgspec
import pytest
from conftest import get_case
from helpers import calibrate, make_registry, rows

from muse.core.deploy import DeploymentStore
from muse.core.objectstore import ObjectStore
from muse.core.registry import Registry
from muse.core.remote import Mirror
from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec, decode_spec, encode_spec
from muse.server.demo.cluster import HAProxy, Load, Replica, converge, stop_all
from muse.server.edge import find_haproxy
from muse.server.testing import S3Server, as_json_rows, wait_until

A = PredictorSpec("a", "1", "fraud", ["lightgbm/1"], calibration="lightgbm/1")
B = PredictorSpec("b", "1", "fraud", ["lightgbm-copy/1"], calibration="lightgbm/1")
SPEC = DeploymentSpec(predictors=[A, B], routes=[RouteSpec("*", "fraud", "a")], description="a active")
REPLICAS = ("r1", "r2", "r3")
CONVERGED_WITHIN = 2.0  # seconds from publication to every replica serving it (issue 18)


@dataclasses.dataclass
class Cluster:
    url: str
    work: pathlib.Path
    env: dict[str, str]  # the store's AWS_* variables
    replicas: dict[str, Replica]

    @property
    def ports(self) -> dict[str, int]:
        return {rid: r.port for rid, r in self.replicas.items()}

    def admin(self) -> DeploymentStore:
        """The deployments as an operator's host sees them: its mirror, pulled."""
        mirror = Mirror.open(self.url, self.work / "host-admin")
        mirror.pull()
        return DeploymentStore(Registry(mirror.root))

    def current(self) -> int:
        generation, _ = Mirror.open(self.url, self.work / "host-admin").current()
        assert generation is not None
        return generation


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_dir):
    work = tmp_path_factory.mktemp("cluster")
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(S3Server(work / "moto.log"))
        env = stack.enter_context(pytest.MonkeyPatch.context())
        for k, v in s3.env.items():
            env.setenv(k, v)
        url = s3.bucket("muse-cluster") + "/registry"
        case = get_case("lightgbm", model_dir, work / "compiled")
        local = make_registry(work / "local", {"lightgbm": case, "lightgbm-copy": case})
        calibrate(local, "lightgbm", {"acme": 1})
        seed = Mirror.open(url, work / "seed")
        shutil.copytree(local.root, seed.root, dirs_exist_ok=True)
        seed.push()
        first = DeploymentStore(Registry(seed.root)).publish(SPEC)
        replicas = {rid: Replica(rid, url, work, s3.env, "--no-auth") for rid in REPLICAS}
        stack.callback(stop_all, list(replicas.values()))
        for r in replicas.values():
            r.start()
        for r in replicas.values():
            r.wait_live()
        wait_until(lambda: all(r.generation() == first for r in replicas.values()), 60, "generation 1 everywhere")
        yield Cluster(url, work, s3.env, replicas)


@pytest.fixture
def live(cluster: Cluster) -> Cluster:
    """The cluster with every replica running (a test that failed may have left one down) and
    serving the store's current generation."""
    for r in cluster.replicas.values():
        if not r.alive:
            r.start()
    for r in cluster.replicas.values():
        r.wait_live()
    current = cluster.current()
    wait_until(
        lambda: all(r.generation() == current for r in cluster.replicas.values()),
        30,
        f"every replica to serve generation {current}",
    )
    return cluster


@pytest.fixture(scope="module")
def haproxy(cluster: Cluster):
    binary = find_haproxy()
    if binary is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy; .ci/run does): no load balancer to test")
    lb = HAProxy(binary, cluster.ports, cluster.work)
    try:
        yield lb
    finally:
        lb.stop()


@pytest.fixture
def lb(live: Cluster, haproxy: HAProxy) -> HAProxy:
    """HAProxy, holding every replica UP."""
    haproxy.wait_status(REPLICAS, "UP")
    return haproxy


def bodies(n: int = 20, events: int = 8) -> list[tuple[bytes, dict[str, str], int]]:
    X = rows(n * events, seed=31)
    out = []
    for i in range(n):
        features = as_json_rows(X[i * events : (i + 1) * events])
        body = {"tenant": "acme", "intent": "fraud", "events": [{"features": f} for f in features]}
        out.append((json.dumps(body).encode(), {"Content-Type": "application/json"}, events))
    return out


def test_replicas_converge_on_a_new_generation_within_two_seconds(live: Cluster) -> None:
    store = live.admin()
    for publish in (lambda: store.publish(SPEC), lambda: store.promote("b")):
        generation = publish()
        since = time.monotonic()  # from publish returning
        seconds = converge(live.ports, generation, since, timeout=10)
        late = {rid: s for rid, s in seconds.items() if s is None or s > CONVERGED_WITHIN}
        assert not late, f"generation {generation}: seconds to serve it per replica {seconds}"


def test_promote_and_rollback_under_load_through_haproxy_fail_no_request(live: Cluster, lb: HAProxy) -> None:
    store = live.admin()
    load = Load({"haproxy": lb.port}, bodies(), clients=3, rate=30)
    start = load.phase("a active")
    load.start()
    try:
        store.publish(SPEC)
        load.wait_answered(start, count=20)
        for action, predictor in ((lambda: store.promote("b"), "b"), (store.rollback, "a")):
            phase = load.phase(predictor)
            generation = action()
            seconds = converge(live.ports, generation, time.monotonic())
            assert None not in seconds.values(), seconds
            # traffic goes on under the new generation, from every replica
            load.wait_answered(phase, predictor=predictor, count=30)
    finally:
        load.stop()
    seen = load.total(list(load.phases))
    assert seen.failures == [], seen.failures[:5]
    assert seen.requests >= 80 and set(seen.by_replica) == set(REPLICAS), seen.by_replica
    assert load.phases["b"].by_predictor.get("b", 0) >= 30 and load.phases["a"].by_predictor.get("a", 0) >= 30
    for name in ("b", "a"):  # each new generation answered from every replica
        assert set(load.phases[name].by_replica) == set(REPLICAS), (name, load.phases[name].by_replica)


def test_a_replica_killed_and_restarted_rejoins_at_the_current_generation(live: Cluster) -> None:
    victim = live.replicas["r2"]
    others = {rid: port for rid, port in live.ports.items() if rid != victim.rid}
    victim.kill()  # SIGKILL, all its processes
    assert victim.generation() is None
    # published while it is down: the others converge, its mirror is left behind
    generation = live.admin().publish(SPEC)
    assert None not in converge(others, generation, time.monotonic()).values()
    victim.start()
    first = wait_until(victim.generation, 60, "the restarted replica to be ready", interval=0.01)
    assert first == generation, f"it first served generation {first}, not the current {generation}"


def test_concurrent_deploy_applies_never_share_a_generation_number(live: Cluster, tmp_path: pathlib.Path) -> None:
    """`muse deploy apply` from two hosts at once (real CLI processes, each with its own cache),
    twice: every publication gets its own number, which holds what that host applied."""
    published: dict[int, str] = {}
    for round_ in range(2):
        procs = []
        try:
            for host in ("x", "y"):
                description = f"host {host}, round {round_}"
                spec = tmp_path / f"{host}-{round_}.toml"
                spec.write_bytes(encode_spec(msgspec.structs.replace(SPEC, description=description)))
                env = {**os.environ, **live.env, "MUSE_CACHE_DIR": str(tmp_path / f"host-{host}")}
                command = [
                    sys.executable,
                    "-m",
                    "muse.server.cli",
                    "deploy",
                    "apply",
                    str(spec),
                    "--registry",
                    live.url,
                ]
                procs.append(
                    (description, subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
                )
            for description, proc in procs:
                out, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err.decode()
                found = re.search(r"published as generation (\d+)", out.decode())
                assert found, out.decode()
                generation = int(found.group(1))
                assert generation not in published, (
                    f"generation {generation} published by {published[generation]!r} and {description!r}"
                )
                published[generation] = description
        finally:
            for _, proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    store = ObjectStore(live.url)
    for generation, description in published.items():
        blob = store.get(f"deployments/{generation}.toml")
        assert blob is not None
        assert decode_spec(blob.data, f"{generation}.toml").description == description
    latest = max(published)
    assert live.current() == latest
    assert None not in converge(live.ports, latest, time.monotonic()).values()
