"""A registry on object storage (core/objectstore.py, core/remote.py, server/replica.py),
against moto's S3 server on loopback: every command on an s3:// registry, generations claimed
by conditional writes, checksums, and a server following the store and uploading its log."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import threading

import msgspec
import obstore
import polars as pl
import pytest
from conftest import get_case
from helpers import calibrated_registry, rows

from muse.calib.artifact import carried_over
from muse.core.deploy import DeploymentStore, GenerationConflict
from muse.core.objectstore import ObjectStore, StoreError
from muse.core.registry import Registry
from muse.core.remote import Mirror
from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec, encode_spec
from muse.server.cli import main as cli
from muse.server.testing import LocalServer, S3Server, as_json_rows, wait_until

A = PredictorSpec("a", "1", "fraud", ["lightgbm/1"], calibration="lightgbm/1")
B = PredictorSpec("b", "1", "fraud", ["lightgbm-copy/1"], calibration="lightgbm/1")
SPEC = DeploymentSpec(predictors=[A, B], routes=[RouteSpec("*", "fraud", "a")])
_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def store_env(s3, tmp_path, monkeypatch):
    """The AWS_* environment of the test server, and a host cache of this test's own."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MUSE_CACHE_DIR", str(tmp_path / "host-a"))
    return {**s3.env, "MUSE_CACHE_DIR": str(tmp_path / "host-a")}


@pytest.fixture
def url(s3, store_env, tmp_path, model_dir):
    """A fresh bucket holding the deployment tests' registry (lightgbm calibrated, no generation)."""
    url = s3.bucket(f"muse-test-{os.getpid()}-{next(_buckets)}") + "/registry"
    local = calibrated_registry(tmp_path / "local", model_dir)
    seed = Mirror.open(url, tmp_path / "seed")
    shutil.copytree(local.root, seed.root, dirs_exist_ok=True)
    seed.push()
    return url


def host(tmp_path: pathlib.Path, name: str, url: str) -> Registry:
    """The registry at ``url`` as another host sees it: a mirror in a cache of its own, pulled."""
    mirror = Mirror.open(url, tmp_path / name)
    mirror.pull()
    return Registry(mirror.root)


def test_every_command_takes_a_registry_url(url, tmp_path, model_dir, capsys):
    spec = tmp_path / "deploy.toml"
    spec.write_bytes(encode_spec(SPEC))
    source = get_case("lightgbm", model_dir, tmp_path / "compiled").source
    assert cli(["compile", str(source), "--registry", url, "--name", "fresh"]) == 0
    assert cli(["deploy", "apply", str(spec), "--registry", url]) == 0
    assert cli(["promote", "b", "--registry", url]) == 0
    assert cli(["rollback", "--registry", url]) == 0
    assert cli(["keys", "add", "--tenant", "acme", "--registry", url]) == 0
    scores = tmp_path / "scores.parquet"
    model = Registry(Mirror.open(url).root).load_model("fresh/1")
    pl.DataFrame({"margin": model.predict(rows(3000, seed=5), margin=True)}).write_parquet(scores)
    assert (
        cli(["calib", "fit", "--registry", url, "--model", "fresh", "--reference", "fraud", "--scores", str(scores)])
        == 0
    )
    capsys.readouterr()

    # another host sees all of it, from the store alone
    other = host(tmp_path, "host-b", url)
    store = DeploymentStore(other)
    assert store.current_generation() == 3 and store.generations() == [1, 2, 3]
    assert [r.active for r in store.read(2).routes] == ["b"] and [r.active for r in store.read(3).routes] == ["a"]
    assert other.load_model("fresh/1").manifest.library_sha256 == model.manifest.library_sha256
    assert other.load_calibration("fresh/1").name == "fresh"
    assert "acme" in (other.root / "keys.toml").read_text()
    assert cli(["deploy", "show", "--registry", url]) == 0
    assert capsys.readouterr().out.startswith("# generation 3")
    # nothing local is named as the registry: the store is
    assert cli(["deploy", "show", "--registry", url.replace("registry", "nothing-here")]) == 0
    assert "nothing deployed" in capsys.readouterr().out


def test_two_hosts_publishing_at_once_never_share_a_generation(url, tmp_path):
    hosts = [DeploymentStore(host(tmp_path, f"host-{i}", url)) for i in range(3)]
    taken: list[int] = []
    errors: list[BaseException] = []

    def publish(store: DeploymentStore) -> None:
        try:
            for _ in range(5):
                taken.append(store.publish(SPEC))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(s,)) for s in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 15
    generation, _ = Mirror.of(hosts[0].registry.root).current()  # type: ignore[union-attr]
    assert generation == max(taken)
    # the claims that lost a race were withdrawn: every stored generation was current once
    keys = [o.key for o in ObjectStore(url).list("deployments/") if o.key.endswith(".toml")]
    assert {int(k.removeprefix("deployments/").removesuffix(".toml")) for k in keys} == set(taken)
    # a deployment derived from a generation that is no longer current is refused, its claim withdrawn
    with pytest.raises(GenerationConflict, match=f"generation {generation} was published after generation 1"):
        hosts[1].publish(SPEC, after=1)
    assert hosts[2].publish(SPEC, after=generation) == generation + 1


def test_the_mirror_refuses_an_object_whose_checksum_does_not_match(url, tmp_path, capsys):
    store = ObjectStore(url)
    key = "calibrations/lightgbm/1/calibration.json"
    good = store.get(key)
    assert good is not None
    obstore.put(store._store, key, good.data[:-20], attributes={"sha256": good.sha256})  # a torn upload
    with pytest.raises(StoreError, match=f"{key}: content does not match its sha256"):
        Mirror.open(url, tmp_path / "host-b").pull()
    assert cli(["deploy", "show", "--registry", url]) == 2
    assert "content does not match its sha256" in capsys.readouterr().err


def test_an_object_over_the_size_limit_is_refused_before_its_bytes(url, tmp_path, monkeypatch):
    """Every read of the store is bounded by the object's size as the store reports it, so a pull
    never holds more than MAX_OBJECT_BYTES of one object in memory."""
    from muse.core import objectstore

    store = ObjectStore(url)
    key = "calibrations/lightgbm/1/calibration.json"
    size = len(store.get(key).data)  # type: ignore[union-attr]
    monkeypatch.setattr(objectstore, "MAX_OBJECT_BYTES", size - 1)
    with pytest.raises(StoreError, match=f"{key}: {size:,} bytes, more than the {size - 1:,}"):
        store.get(key)
    with pytest.raises(StoreError, match="an object of a registry may hold"):
        Mirror.open(url, tmp_path / "host-b").pull()


def test_a_version_two_hosts_wrote_belongs_to_the_one_that_claimed_it_first(url, tmp_path):
    first, second = (host(tmp_path, name, url) for name in ("host-b", "host-c"))
    for reg, created, tenants in ((first, "first", []), (second, "second", ["acme"])):
        cal = msgspec.structs.replace(reg.load_calibration("lightgbm/1"), created_at=created)
        maps = [msgspec.structs.replace(cal, tenant=t) for t in [None, *tenants]]
        reg.publish_calibration([carried_over(m, name="lightgbm", version="9") for m in maps])
    assert reg.mirror is not None and first.mirror is not None
    first.mirror.push()
    with pytest.raises(StoreError, match="another host wrote it meanwhile; this command's copy was moved to"):
        reg.mirror.push()
    assert list((reg.root / ".conflicts" / "calibrations" / "lightgbm").glob("9.*/tenants/*.json"))  # kept aside
    theirs = host(tmp_path, "host-d", url)
    assert (
        theirs.load_calibration("lightgbm/9").created_at == "first" and theirs.calibration_tenants("lightgbm/9") == []
    )
    # the loser's mirror takes the store's version at its next pull, and sends nothing of its own into it
    reg.mirror.pull()
    reg.mirror.push()
    assert reg.load_calibration("lightgbm/9").created_at == "first" and reg.calibration_tenants("lightgbm/9") == []
    assert not ObjectStore(url).list("calibrations/lightgbm/9/tenants/")


def add_key(url: str, capsys) -> str:
    capsys.readouterr()
    assert cli(["keys", "add", "--tenant", "acme", "--registry", url]) == 0
    return capsys.readouterr().out.strip()


def score(server: LocalServer, key: str, n: int, seed: int = 9) -> tuple[int, dict]:
    events = [{"features": f} for f in as_json_rows(rows(n, seed=seed))]
    status, body, _ = server.post("/v1/score", {"tenant": "acme", "intent": "fraud", "events": events}, key=key)
    return status, body


def test_a_server_follows_the_store_and_uploads_its_score_log(url, store_env, tmp_path, capsys):
    first = DeploymentStore(host(tmp_path, "host-b", url)).publish(SPEC)
    key = add_key(url, capsys)
    server = LocalServer(url, "--replica-id", "r1", env=store_env, log_dir=tmp_path)
    try:
        server.wait_ready(generation=first)
        for _ in range(4):
            status, body = score(server, key, 10)
            assert status == 200, body
        # a new generation from another host: the server converges on it
        second = DeploymentStore(host(tmp_path, "host-c", url)).promote("b")
        server.wait_ready(generation=second, timeout=10)
        status, body = score(server, key, 5)
        assert status == 200 and body["predictor"] == "b", body
        # a key added on another host is accepted once the replica has read keys.toml again
        later = add_key(url, capsys)
        wait_until(lambda: score(server, later, 1)[0] == 200, 10, "the replica to accept the new key")
    finally:
        server.stop()
    # SIGTERM: the workers flushed their last rows, and the replica uploaded them before it exited
    logged = ObjectStore(url).list("scorelog/")
    assert logged and all(o.key.startswith("scorelog/replica=r1/scores-") for o in logged)
    frame = pl.read_parquet(f"{url}/scorelog/replica=r1/*.parquet")
    assert frame.height >= 46 and frame.filter(pl.col("predictor") == "b").height >= 6
    assert not list((Mirror.open(url).root / "scorelog").rglob("scores-*.parquet"))  # deleted once stored
    # readers take the uploaded log from the store: calib status's default is REGISTRY/scorelog
    capsys.readouterr()
    code = cli(["calib", "status", "--registry", url, "--min-samples", "1", "--all-generations"])
    table = capsys.readouterr().out
    assert "intent fraud" in table and " acme " in table
    assert code == (1 if "drifted series" in table else 0)  # the exit status says what the table says
    assert cli(["usage", "--registry", url, "--format", "json"]) == 0
    (acme,) = json.loads(capsys.readouterr().out)
    assert acme["tenant"] == "acme" and acme["logged_rows"] == frame.filter(pl.col("role") == "active").height


def test_a_server_keeps_serving_while_the_store_is_down(store_env, tmp_path, model_dir, monkeypatch):
    with S3Server(tmp_path / "moto-own.log") as own:  # this test stops it
        for k, v in own.env.items():
            monkeypatch.setenv(k, v)
        url = own.bucket("muse-outage") + "/registry"
        seed = Mirror.open(url, tmp_path / "seed")
        shutil.copytree(calibrated_registry(tmp_path / "local", model_dir).root, seed.root, dirs_exist_ok=True)
        seed.push()
        first = DeploymentStore(Registry(seed.root)).publish(SPEC)
        server = LocalServer(url, "--no-auth", env={**store_env, **own.env}, log_dir=tmp_path)
        try:
            server.wait_ready(generation=first)
            own.stop()
            wait_until(lambda: "failed, retrying" in server.output(whole=True), 60, "the replica to see the outage")
            status, body = score(server, "", 3)
            assert status == 200, body
        finally:
            server.stop()
        # a replica restarted while the store is still down serves its mirror's generation
        again = LocalServer(url, "--no-auth", env={**store_env, **own.env}, log_dir=tmp_path)
        try:
            again.wait_ready(generation=first)
            assert score(again, "", 2)[0] == 200
            assert "serving the mirror's generation until the store answers" in again.output(whole=True)
        finally:
            again.stop()


def test_registry_urls_are_checked():
    for bad, message in [
        ("ftp://x/y", "use s3://BUCKET/PREFIX"),
        ("s3://A_Bucket/p", "not a valid bucket name"),
        ("s3://bucket/../etc", "must be letters"),
    ]:
        with pytest.raises(ValueError, match=message):
            ObjectStore(bad)


def test_scores_read_from_a_url_name_the_location(url):
    from muse.calib.samples import SampleError, query_score_log

    assert query_score_log(f"{url}/scorelog", lambda f: f) is None
    with pytest.raises(SampleError, match="s3://no-such-bucket-x/scorelog: cannot read the score log"):
        query_score_log("s3://no-such-bucket-x/scorelog", lambda f: f)


def test_a_generation_is_published_after_what_it_names(url, tmp_path):
    """A refresh fits a calibration and publishes a generation naming it in one command: the
    calibration reaches the store before the generation that replicas would load."""
    reg = host(tmp_path, "host-b", url)
    cal = reg.load_calibration("lightgbm/1")
    reg.publish_calibration([carried_over(cal, name="lightgbm", version="2")])
    switched = msgspec.structs.replace(SPEC, predictors=[msgspec.structs.replace(A, calibration="lightgbm/2"), B])
    generation = DeploymentStore(reg).apply(switched)
    other = host(tmp_path, "host-c", url)
    assert DeploymentStore(other).current_generation() == generation
    assert other.load_calibration("lightgbm/2").version == "2"
