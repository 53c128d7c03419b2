"""`muse edge`: HAProxy rendered from the deployment's quotas and the registry's keys, in front of
a real `muse serve` on loopback: a tenant over its edge limit refused by HAProxy, the others and
the operators through; unknown keys on to the server; `sync` applying a new generation and a new
key to a running HAProxy; names of every kind safe in the maps and the refusal's body."""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import msgspec
import pytest
from conftest import get_case
from helpers import make_registry
from hypothesis import given, settings
from hypothesis import strategies as st

from muse.calib.names import is_tenant
from muse.core.registry import Registry
from muse.core.spec import DeploymentSpec, PredictorSpec, QuotaSpec, RouteSpec
from muse.server import edge
from muse.server.auth import KeyFile, KeyRecord, add_key, keys_path, read_keys, write_keys
from muse.server.cli import main
from muse.server.testing import LocalServer, deploy, free_port, request, stop_process, wait_until

HAPROXY = edge.find_haproxy()
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (CI installs it)")

WINDOW = 60  # s: within one window HAProxy's count is exact (no earlier period to weigh in)
ODD = 'Zoë "the ☃" O\'Brien 😀 # x'  # quotes, spaces, a '#', non-ASCII beyond the BMP
SECRET = "s3_cr_et-with_underscores"  # the secret after muse_<id>_ may hold '_' itself
QUOTAS = [
    QuotaSpec("*", rows_per_second=1000),
    QuotaSpec(ODD, rows_per_second=0.1, burst_rows=2),  # the edge: ceil(max(0.1 * 60, 2)) = 6 requests
    QuotaSpec("hooli", rows_per_second=0.1, burst_rows=7),  # 7: its burst
    QuotaSpec("unlimited-co", max_inflight_rows=100_000),  # no rate of its own, "*"'s
]
SPEC = DeploymentSpec(
    predictors=[PredictorSpec("p", "1", "fraud", ["lightgbm/1"])], routes=[RouteSpec("*", "fraud", "p")], quotas=QUOTAS
)


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir):
    """A registry (keys for ODD, globex, hooli, an admin) and `muse serve` on it."""
    root = tmp_path_factory.mktemp("edge")
    reg = make_registry(root / "registry", {"lightgbm": get_case("lightgbm", model_dir, root / "compiled")})
    deploy(reg, SPEC)
    path = keys_path(reg.root)
    keys = {t: add_key(path, t, False)[1] for t in ("globex", "hooli")}
    keys["admin"] = add_key(path, None, True)[1]
    held = read_keys(path)
    held.keys.append(KeyRecord("0dd0dd00", hashlib.sha256(SECRET.encode()).hexdigest(), ODD))
    write_keys(path, held)
    keys[ODD] = f"muse_0dd0dd00_{SECRET}"
    with LocalServer(reg.root) as server:
        server.wait_ready(generation=1)
        yield reg, server, keys


@pytest.fixture
def own_served(tmp_path, served):
    """A copy of the module's registry with a server of its own, for a test that publishes and
    adds keys: the module's registry and server stay as every other test expects them."""
    reg, _, keys = served
    copy = make_registry_copy(reg, tmp_path / "registry")
    with LocalServer(copy.root) as server:
        server.wait_ready(generation=1)
        yield copy, server, dict(keys)


def make_registry_copy(reg: Registry, root: pathlib.Path) -> Registry:
    shutil.copytree(reg.root, root, ignore=shutil.ignore_patterns("server-*.log", "scorelog"))
    return Registry(root)


def score(port: int, tenant: str, key: str | None, header: str = "authorization") -> tuple[int, object, dict]:
    body = json.dumps({"tenant": tenant, "intent": "fraud", "events": [{"features": [0.5] * 6}]}).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "authorization" else key
    return request(port, "POST", "/v1/score", body, headers)


def at_edge(answer: tuple[int, object, dict]) -> bool:
    status, body, _ = answer
    return status == 429 and isinstance(body, dict) and "at the edge" in body["error"]


def start_edge(tmp_path: pathlib.Path, served, **kw) -> edge.Edge:
    """An edge in front of the module's server, once a request goes through it (an admin key's:
    waiting spends no tenant's budget)."""
    reg, server, keys = served
    config = edge.render(reg, tmp_path / "edge", [f"127.0.0.1:{server.port}"], f"127.0.0.1:{free_port()}", **kw)
    front = edge.Edge(config, HAPROXY)
    try:
        wait_until(lambda: score(front.port, "globex", keys["admin"])[0] == 200, 30, "the edge to reach the server")
    except BaseException:
        front.stop()
        raise
    return front


@needs_haproxy
def test_a_tenant_over_its_edge_limit_is_refused_by_haproxy_and_the_others_go_on(tmp_path, served):
    keys = served[2]
    with start_edge(tmp_path, served, window=WINDOW) as front:
        answers = [score(front.port, ODD, keys[ODD], header) for header in ["authorization", "x-api-key"] * 3]
        # 6 through to the server (which answers 200 for its burst of 2 rows, then its own 429)
        assert not any(at_edge(a) for a in answers), answers
        assert [a[0] for a in answers[:2]] == [200, 200] and answers[-1][1]["error"].startswith(f"tenant {ODD!r}")
        status, body, headers = score(front.port, ODD, keys[ODD])
        assert at_edge((status, body, headers)) and headers["content-type"] == "application/json"
        assert int(headers["retry-after"]) >= 1
        assert body == {"error": f"tenant {ODD!r} is over its quota at the edge: 6 requests in 60 s; retry in 10 s"}
        assert all(score(front.port, "globex", keys["globex"])[0] == 200 for _ in range(10))
        # another key id with ODD's secret spends ODD's budget (refused), never globex's
        globex_id = keys["globex"].split("_")[1]
        assert at_edge(score(front.port, ODD, f"muse_{globex_id}_{SECRET}"))
        assert score(front.port, "globex", f"muse_{globex_id}_forged")[0] == 401
        # neither spent anything of globex's
        assert score(front.port, "globex", keys["globex"])[0] == 200


@needs_haproxy
def test_unknown_and_absent_keys_go_on_to_the_server_within_their_own_limit(tmp_path, served):
    with start_edge(tmp_path, served, window=WINDOW, unknown_per_second=4 / WINDOW) as front:
        answers = [score(front.port, "globex", key) for key in ("muse_feedface_nope", None, "not-a-muse-key", None)]
        # the server's own 401s
        assert [a[0] for a in answers] == [401] * 4, answers
        assert "unknown or revoked key" in answers[0][1]["error"] and "missing credential" in answers[1][1]["error"]
        status, body, _ = score(front.port, "globex", "muse_feedface_nope")
        assert status == 429 and body["error"].startswith("requests with an unknown key or none are over their limit")


@needs_haproxy
def test_admin_keys_are_never_limited(tmp_path, served):
    keys = served[2]
    with start_edge(tmp_path, served, window=WINDOW, unknown_per_second=1 / WINDOW) as front:
        # far past the limit of unknown keys (1) and of any tenant's at the edge here (ODD's: 6)
        answers = [score(front.port, "globex", keys["admin"]) for _ in range(12)]
        # read as the server reads a key: blanks after "Bearer " or around it are not part of it
        answers += [score(front.port, "globex", f"\t{keys['admin']} ") for _ in range(3)]
        answers += [score(front.port, "globex", f" {keys['admin']}\t", "x-api-key") for _ in range(3)]
        assert [a[0] for a in answers] == [200] * 18, answers


@needs_haproxy
def test_sync_applies_a_new_generation_and_a_new_key_to_a_running_haproxy(tmp_path, own_served):
    reg, server, keys = own_served
    out = tmp_path / "edge"
    # many tenants, so that a map goes to HAProxy in several commands
    path = keys_path(reg.root)
    bulk = read_keys(path)
    many = [KeyRecord(f"b{i:07x}", hashlib.sha256(f"bulk{i}".encode()).hexdigest(), f"bulk {i}") for i in range(300)]
    write_keys(path, KeyFile([*bulk.keys, *many]))
    config = edge.render(reg, out, [f"127.0.0.1:{server.port}"], f"127.0.0.1:{free_port()}", window=WINDOW)
    log = open(tmp_path / "sync.log", "wb")  # noqa: SIM115 -- the sync's lifetime
    cmd = [sys.executable, "-m", "muse.server.cli", "edge", "sync", "--registry", str(reg.root), "--out", str(out)]
    sync = subprocess.Popen([*cmd, "--log-format", "text"], stdout=log, stderr=subprocess.STDOUT)
    try:
        # HAProxy is not there yet: said once, then retried
        wait_until(lambda: "failed, retrying" in (tmp_path / "sync.log").read_text(), 30, "the sync to miss HAProxy")
        with edge.Edge(config, HAPROXY) as front:
            wait_until(lambda: "works again" in (tmp_path / "sync.log").read_text(), 30, "the sync to reach HAProxy")
            wait_until(lambda: score(front.port, "globex", keys["admin"])[0] == 200, 30, "the edge to reach the server")
            shown = edge.runtime(front.settings.socket, f"show map {out / edge.LIMITS_MAP}\n")
            assert len(shown.strip().splitlines()) == 1 + 3 + 300  # unknown, globex, hooli, ODD, the bulk
            answers = [score(front.port, "hooli", keys["hooli"]) for _ in range(8)]
            assert not any(at_edge(a) for a in answers[:7]), answers
            assert at_edge(answers[-1]) and "7 requests in 60 s" in answers[-1][1]["error"], answers
            # a new tenant's key and a generation raising hooli's limit and setting initech's
            keys["initech"] = add_key(path, "initech", False)[1]
            quotas = [*QUOTAS[:2], QuotaSpec("hooli", rows_per_second=0.1, burst_rows=20)]
            quotas.append(QuotaSpec("initech", rows_per_second=0.01, burst_rows=2))  # 2 requests
            deploy(reg, msgspec.structs.replace(SPEC, quotas=quotas))
            wait_until(lambda: not at_edge(score(front.port, "hooli", keys["hooli"])), 30, "hooli's new limit")
            refused = wait_until(
                lambda: a if at_edge(a := score(front.port, "initech", keys["initech"])) else None,
                30,
                "initech's key and limit at the edge",
            )
            assert "tenant 'initech'" in refused[1]["error"] and "2 requests in 60 s" in refused[1]["error"]
            # the files hold what HAProxy holds: a restart starts from them
            assert edge.tenant_token("initech") in (out / edge.LIMITS_MAP).read_text()
            assert (
                hashlib.sha256(keys["initech"].split("_", 2)[2].encode()).hexdigest()
                in (out / edge.KEYS_MAP).read_text()
            )
        text = (tmp_path / "sync.log").read_text()
        assert text.count("failed, retrying") == 1 and "generation 2" in text, text
    finally:
        stop_process(sync, 10)
        log.close()


def test_sync_replaces_the_maps_haproxy_was_given_however_out_is_spelled(tmp_path, served):
    """HAProxy knows a map by the path its configuration names: a sync pointed at the same
    directory by another spelling (a symlink here) writes and replaces the rendered paths."""
    reg, _, _ = served
    edge.render(reg, tmp_path / "edge", ["127.0.0.1:1"], "127.0.0.1:2")
    (tmp_path / "alias").symlink_to(tmp_path / "edge")
    sync = edge.EdgeSync(reg, tmp_path / "alias")
    assert sync.settings.directory == str(tmp_path / "edge")
    assert f"map({tmp_path / 'edge' / edge.KEYS_MAP}" in (tmp_path / "edge" / "haproxy.cfg").read_text()


@needs_haproxy
def test_haproxy_accepts_the_rendered_configuration(tmp_path, served):
    reg, _, _ = served
    backends = ["127.0.0.1:8000", "[::1]:8001", "localhost:8002"]
    config = edge.render(reg, tmp_path / "e", backends, "*:18080", window=5, socket_path=tmp_path / "api.sock")
    edge.check_config(config, HAPROXY)
    text = config.read_text()
    assert "server s3 localhost:8002" in text and "gpc0_rate(5s)" in text and str(tmp_path / "api.sock") in text


def test_edge_limits_follow_the_servers_resolution_of_quotas():
    quotas = [QuotaSpec("*", rows_per_second=100, burst_rows=400), QuotaSpec("acme", rows_per_second=10)]
    assert edge.edge_limit(quotas, "globex", 10) == 100 * 10  # 10 s of its rate: more than its burst
    assert edge.edge_limit(quotas, "globex", 2) == 400  # its burst: more than 2 s of its rate
    assert edge.edge_limit(quotas, "acme", 1) == 20  # its burst goes with its own rate: 2 s of it
    assert edge.edge_limit([QuotaSpec("acme", rows_per_second=0.3)], "acme", 7) == 3  # ceil(2.1)
    assert edge.edge_limit([QuotaSpec("acme", rows_per_second=10)], "globex", 10) is None
    keys = [KeyRecord("a", "A" * 64, "acme"), KeyRecord("b", "b" * 64, "globex"), KeyRecord("c", "c" * 64, admin=True)]
    keys.append(KeyRecord("d", "not a digest", "acme"))
    maps = edge.render_maps([QuotaSpec("acme", rows_per_second=1)], keys, 10, 5)
    assert maps.keys == [
        ("a" * 64, edge.tenant_token("acme")),
        ("b" * 64, edge.tenant_token("globex")),
        ("c" * 64, "operator"),
    ]
    assert [k for k, _ in maps.limits] == ["unknown", edge.tenant_token("acme")]  # globex: no rate, not limited
    assert maps.limits[0][1].startswith("50:1:")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backend", "localhost"], "--backend 'localhost': expected HOST:PORT"),
        (["--bind", "x y:80"], "--bind 'x y:80': expected HOST:PORT"),
        (["--bind", ":99999"], "--bind ':99999'"),
        (["--out", "{tmp}/a b"], "HAProxy reads this path bare"),
        (["--window", "0s"], "--window '0s'"),
        (["--window", "2h"], "--window 7200s: give 1s to 3600s"),
    ],
)
def test_render_names_the_flag_at_fault(tmp_path, capsys, argv, message):
    (tmp_path / "reg").mkdir()
    args = {"--registry": str(tmp_path / "reg"), "--backend": "127.0.0.1:8000", "--bind": "127.0.0.1:8080"}
    args["--out"] = str(tmp_path / "out")
    args.update({flag: value.replace("{tmp}", str(tmp_path)) for flag, value in zip(argv[::2], argv[1::2])})
    assert main(["edge", "render", *[x for item in args.items() for x in item]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# -- names of every kind ------------------------------------------------------------------------


def haproxy_map(text: str) -> dict[str, str]:
    """A map file as HAProxy reads it: comments and blank lines skipped, the key up to the first
    blank, the value the rest with blanks around it dropped."""
    entries = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        entries[key] = value.strip()
    return entries


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(name=names, requests=st.integers(1, 10**9), window=st.integers(1, 3600))
def test_a_refusal_body_is_json_naming_the_tenant_whatever_its_name(name, requests, window):
    value = edge.limit_entry(name, requests, window)
    assert not any(c.isspace() or c in "#\\" for c in value)  # nothing a map file or the runtime API splits
    count, retry, body = value.split(":")
    assert int(count) == requests and int(retry) >= 1
    assert json.loads(base64.b64decode(body))["error"].startswith(f"tenant {name!r} is over its quota at the edge")


@settings(max_examples=100, deadline=None)
@given(tenants=st.lists(names.filter(is_tenant), min_size=1, max_size=5, unique=True))
def test_rendered_maps_round_trip_tenant_names(tenants):
    keys = [KeyRecord(f"k{i}", hashlib.sha256(t.encode()).hexdigest(), t) for i, t in enumerate(tenants)]
    maps = edge.render_maps([QuotaSpec("*", rows_per_second=5)], keys, 10, 100)
    files = {name: haproxy_map(data.decode()) for name, data in maps.files().items()}
    for t in tenants:
        token = files[edge.KEYS_MAP][hashlib.sha256(t.encode()).hexdigest()]
        body = json.loads(base64.b64decode(files[edge.LIMITS_MAP][token].split(":")[2]))
        assert body["error"].startswith(f"tenant {t!r} is over its quota at the edge: 50 requests in 10 s")


def test_sync_once_survives_nothing_and_names_a_missing_render(tmp_path, capsys):
    (tmp_path / "reg").mkdir()
    assert main(["edge", "sync", "--registry", str(tmp_path / "reg"), "--out", str(tmp_path / "none"), "--once"]) == 2
    assert "no edge.json; write the edge there first with `muse edge render`" in capsys.readouterr().err
