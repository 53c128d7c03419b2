"""Quotas: the deployment's limits per tenant (merging, per-worker shares, token buckets
in debt, rows in flight), and a real server answering 429 to the tenant over quota only."""

from __future__ import annotations

import json

import msgspec
import pytest
from conftest import get_case
from helpers import make_registry
from hypothesis import given, settings
from hypothesis import strategies as st

from muse.core.spec import DeploymentSpec, PredictorSpec, QuotaSpec, RouteSpec, SpecError, decode_spec
from muse.server.auth import add_key, keys_path
from muse.server.errors import HTTPError
from muse.server.quotas import UNLIMITED, Limits, Quotas
from muse.server.testing import LocalServer, deploy, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def quotas(*entries: QuotaSpec, workers: int = 1) -> tuple[Quotas, Clock]:
    clock = Clock()
    q = Quotas(workers, clock)
    q.configure(list(entries), generation=1)
    return q, clock


def test_a_tenant_entry_overrides_the_default_field_by_field():
    q, _ = quotas(
        QuotaSpec("*", rows_per_second=100, burst_rows=400, max_inflight_rows=50, priority="low"),
        QuotaSpec("acme", rows_per_second=10),
        QuotaSpec("hooli", priority="high"),
    )
    assert q.limits("globex") == Limits(100, 400, 50, 1)
    assert q.limits("acme") == Limits(10, 20, 50, 1)  # its burst goes with its own rate: 2 s of it
    assert q.limits("hooli") == Limits(100, 400, 50, 4)
    assert quotas(QuotaSpec("acme", rows_per_second=10))[0].limits("globex") is UNLIMITED


def test_each_worker_holds_its_share():
    q, _ = quotas(QuotaSpec("*", rows_per_second=90, burst_rows=100, max_inflight_rows=7), workers=3)
    assert q.limits("acme") == Limits(30, 34, 3, 2)


def test_over_quota_is_429_with_retry_after_and_the_other_tenant_goes_on():
    q, clock = quotas(QuotaSpec("*", rows_per_second=10, burst_rows=10))
    q.admit("acme", 25, "$.tenant")  # the bucket is not empty: a big request goes, in debt
    with pytest.raises(HTTPError) as refused:
        q.check("acme", "$.tenant")
    assert refused.value.status == 429 and dict(refused.value.headers)[b"retry-after"] == b"2"
    assert "over its quota of 10 rows/s" in refused.value.message and refused.value.field == "$.tenant"
    q.admit("globex", 5, "$.tenant")  # buckets are per tenant
    clock.now += 1.5  # 15 rows back: the debt of 15 is paid, the bucket at 0 still refuses
    with pytest.raises(HTTPError):
        q.admit("acme", 1, "$.tenant")
    clock.now += 0.1
    q.admit("acme", 1, "$.tenant")


def test_rows_in_flight_are_capped_but_a_lone_request_always_goes():
    q, _ = quotas(QuotaSpec("*", max_inflight_rows=100))
    held = q.admit("acme", 500, "$.tenant")  # nothing in flight: it goes, however large
    with pytest.raises(HTTPError, match="500 rows in flight; its max_inflight_rows is 100"):
        q.admit("acme", 1, "$.tenant")
    q.release(held, 500)
    q.admit("acme", 60, "$.tenant")
    q.admit("acme", 40, "$.tenant")
    with pytest.raises(HTTPError):
        q.admit("acme", 1, "$.tenant")


def test_a_new_generation_changes_limits_and_keeps_unchanged_buckets():
    q, clock = quotas(QuotaSpec("*", rows_per_second=10, burst_rows=10), QuotaSpec("acme", rows_per_second=5))
    q.admit("acme", 10, "$.tenant")  # its bucket (2 s of 5 rows/s) empty
    q.admit("globex", 20, "$.tenant")  # 10 rows in debt
    q.configure([QuotaSpec("*", rows_per_second=10, burst_rows=10), QuotaSpec("acme", rows_per_second=50)], 2)
    clock.now += 0.05
    q.admit("acme", 1, "$.tenant")  # its bucket as it was, refilling at the new rate: 2.5 rows back
    with pytest.raises(HTTPError):
        q.admit("globex", 1, "$.tenant")  # unchanged: still in debt


@settings(max_examples=60, deadline=None)
@given(
    rate=st.integers(1, 1000),
    burst=st.integers(1, 5000),
    steps=st.lists(st.tuples(st.floats(0, 2), st.integers(1, 3000)), min_size=1, max_size=60),
)
def test_admitted_rows_never_exceed_the_burst_plus_the_refill_plus_one_request(rate, burst, steps):
    q, clock = quotas(QuotaSpec("t", rows_per_second=rate, burst_rows=burst))
    start, admitted, largest = clock.now, 0, 0
    for dt, rows in steps:
        clock.now += dt
        try:
            q.admit("t", rows, "$.tenant")
        except HTTPError as exc:
            assert exc.status == 429
            continue
        admitted += rows
        largest = max(largest, rows)
        assert admitted <= burst + rate * (clock.now - start) + largest + 1e-6


def test_deployments_validate_quotas():
    base = b'[[predictors]]\nname="p"\nversion="1"\nintent="i"\nmodels=["m/1"]\n'
    base += b'[[routes]]\ntenant="*"\nintent="i"\nactive="p"\n'
    with pytest.raises(SpecError, match=r"quotas\[0\]"):
        decode_spec(base + b'[[quotas]]\ntenant="../x"\n', "d.toml")
    with pytest.raises(SpecError, match="burst_rows needs rows_per_second"):
        decode_spec(base + b'[[quotas]]\ntenant="a"\nburst_rows=5\n', "d.toml")
    with pytest.raises(SpecError, match="priority"):
        decode_spec(base + b'[[quotas]]\ntenant="a"\npriority="urgent"\n', "d.toml")


# -- a real server ------------------------------------------------------------------------


SPEC = DeploymentSpec(
    predictors=[PredictorSpec("p", "1", "fraud", ["lightgbm/1"])],
    routes=[RouteSpec("*", "fraud", "p")],
    quotas=[QuotaSpec("*", rows_per_second=1000, burst_rows=2000), QuotaSpec("acme", rows_per_second=1, burst_rows=1)],
)


def test_a_server_answers_429_to_the_tenant_over_quota_only(tmp_path, model_dir):
    reg = make_registry(tmp_path / "registry", {"lightgbm": get_case("lightgbm", model_dir, tmp_path / "compiled")})
    with pytest.raises(SpecError, match=r"quotas\[1\] \(acme\): a second entry for this tenant"):
        deploy(reg, msgspec.structs.replace(SPEC, quotas=[QuotaSpec("acme"), QuotaSpec("acme")]))
    deploy(reg, SPEC)
    keys = {t: add_key(keys_path(reg.root), t, False)[1] for t in ("acme", "globex")}
    keys["admin"] = add_key(keys_path(reg.root), None, True)[1]
    with LocalServer(reg.root) as server:
        server.wait_ready(generation=1)

        def score(tenant: str, rows: int = 5, key: str | None = None) -> tuple[int, dict, dict]:
            body = {"tenant": tenant, "intent": "fraud", "events": [{"features": [0.5] * 6}] * rows}
            return server.post("/v1/score", body, keys[key or tenant])

        assert score("acme")[0] == 200  # a full bucket of 1 row: 5 rows go, in debt
        status, body, headers = score("acme")
        assert (status, body["field"]) == (429, "$.tenant") and int(headers["retry-after"]) >= 1, body
        assert "over its quota of 1 rows/s" in body["error"]
        assert all(score("globex")[0] == 200 for _ in range(5))
        # an admin key names the tenant in the body: refused once its rows are counted
        assert score("acme", rows=7, key="admin")[0] == 429
        metrics = server.metrics()
        refused = {k: v for k, v in metrics.items() if 'reason="over_quota"' in k}
        assert list(refused) and all('tenant="acme"' in k for k in refused), refused
        assert metrics['muse_rejected_rows_total{intent="fraud",tenant="acme"}'] == 7
        assert metrics['muse_request_bytes_total{intent="fraud",predictor="p",tenant="globex"}'] > 5 * 100
        seconds = {t: metrics.get(f'muse_model_seconds_total{{model="lightgbm/1",tenant="{t}"}}', 0) for t in keys}
        assert seconds["acme"] > 0 and seconds["globex"] > 0, seconds
        # a new generation lifts acme's limit
        deploy(reg, msgspec.structs.replace(SPEC, quotas=[QuotaSpec("acme", rows_per_second=1e6)]))
        server.wait_ready(generation=2)
        wait_until(lambda: score("acme")[0] == 200, 30, "acme under its new quota")


def test_quotas_document_round_trips():
    raw = json.dumps(msgspec.to_builtins(SPEC)).encode()
    assert decode_spec(raw, "d.json") == SPEC


def test_idle_tenants_are_forgotten_past_max_tenants(monkeypatch):
    monkeypatch.setattr("muse.server.quotas.MAX_TENANTS", 3)
    q, clock = quotas(QuotaSpec("*", rows_per_second=10, burst_rows=10))
    q.admit("busy", 5, "$.tenant")  # in flight
    q.release(q.admit("drained", 10, "$.tenant"), 10)
    q.weight("idle")
    q.weight("new")  # the fourth: idle ones with full buckets go, the others stay
    assert set(q._tenants) == {"busy", "drained", "new"}
    clock.now += 5  # drained's bucket is full again, and new's was never touched
    q.weight("newer")  # under the next sweep's size (twice what the last one left): kept
    assert set(q._tenants) == {"busy", "drained", "new", "newer"}
    q.weight("newest")
    assert set(q._tenants) == {"busy", "newest"}


def test_new_limits_forgive_no_debt():
    q, _ = quotas(QuotaSpec("*", rows_per_second=10, burst_rows=10))
    q.admit("acme", 100, "$.tenant")
    q.configure([QuotaSpec("*", rows_per_second=10, burst_rows=10, priority="high")], 2)
    with pytest.raises(HTTPError):
        q.check("acme", "$.tenant")


def test_rows_in_flight_at_the_cap_are_refused_before_the_body():
    q, _ = quotas(QuotaSpec("*", max_inflight_rows=10))
    q.admit("acme", 10, "$.tenant")
    with pytest.raises(HTTPError, match="rows in flight"):
        q.check("acme", "$.tenant")
