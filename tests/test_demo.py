"""`muse demo` end to end on small data (about 20 s): it exits 0, prints the commands it
runs, and its result (WORKDIR/result.json) shows what its output claims."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import pathlib

import msgspec
import pytest

from muse.core.spec import decode_spec
from muse.server.cli import main
from muse.server.demo import BURST_REQUESTS, TENANTS, DemoResult, deployments
from muse.server.demo.report import RateTable

# 5,000 events per tenant per month and 60 trees: v2's gain in recall over v1 (about 0.07
# on average over the edges, on ~100 frauds) is far above what the moment of the switch changes.
ROWS = 5000
TREES = 60
TOLERANCE = 0.25  # of the target, as `muse calib status` flags drift


@dataclasses.dataclass
class Run:
    code: int
    output: str
    work: pathlib.Path
    result: DemoResult


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Run:
    work = tmp_path_factory.mktemp("demo") / "out"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--workdir", str(work), "--rows", str(ROWS), "--trees", str(TREES)])
    result = msgspec.json.decode((work / "result.json").read_bytes(), type=DemoResult)
    return Run(code, out.getvalue(), work, result)


def off_target(table: RateTable, label: str) -> list[str]:
    """Rates further from target than the drift tolerance plus three binomial standard errors."""
    bad = []
    for row in (r for r in table.rows if r.label == label):
        assert row.events > 0, f"{table.intent} {row.tenant} {label}: no events"
        for edge, rate, target in zip(table.edges, row.rates, table.targets):
            allowed = TOLERANCE * target + 3 * math.sqrt(target * (1 - target) / row.events)
            if abs(rate - target) > allowed:
                bad.append(
                    f"{table.intent} {row.tenant} {label} >={edge}: {rate:.3f}, target {target} +- {allowed:.3f}"
                )
    return bad


def test_demo_exits_0_and_prints_every_command_it_runs(demo: Run) -> None:
    assert demo.code == 0, demo.output[-3000:]
    commands = ("compile", "calib fit", "deploy apply", "keys add", "serve", "promote", "usage", "calib status")
    for command in (*commands, "labels import", "refresher"):
        assert f"\n$ muse {command} " in demo.output, f"`muse {command}` not shown"
    assert "== 15." in demo.output and "demo finished" in demo.output


def test_the_deployment_files_it_applies_are_its_structs(demo: Run) -> None:
    for name, spec in (
        ("v1.toml", deployments.V1),
        ("v2-shadow.toml", deployments.V2_SHADOW),
        ("v2-calibrated-shadow.toml", deployments.V2_CALIBRATED_SHADOW),
        ("quotas.toml", deployments.QUOTAS),
    ):
        path = demo.work / name
        assert f"$ muse deploy apply {path} " in demo.output
        assert decode_spec(path.read_bytes(), name) == spec
    fraud = deployments.V2_CALIBRATED_SHADOW.routes[0]
    assert (fraud.active, fraud.shadows) == ("fraud-v1", ["fraud-v2"])
    # The quotas are added to what promotion made: v2 active on fraud.
    assert deployments.QUOTAS.routes[0].active == "fraud-v2" and deployments.QUOTAS.predictors[-1].name == "fraud-v2"
    assert [q.tenant for q in deployments.QUOTAS.quotas] == [deployments.QUOTA_TENANT]


def test_one_tenant_over_its_quota_leaves_the_others_unaffected(demo: Run) -> None:
    r = demo.result
    assert r.quota_tenant == deployments.QUOTA_TENANT and r.quota_tenant in TENANTS
    # Its burst: some answered (its burst allowance), some refused (429), none failed otherwise.
    assert r.quota_refused > 0 and r.quota_answered > 0, (r.quota_refused, r.quota_answered)
    assert r.quota_refused + r.quota_answered == BURST_REQUESTS
    assert r.quota_others_requests > 0 and r.quota_others_failures == [] and r.failures == []
    assert f"{r.quota_refused} refused (429)" in demo.output and "Retry-After: " in demo.output
    # `muse usage` shows the refusals per tenant: the limited tenant's row has a 429 count.
    header, *rows = demo.output.split("$ muse usage ", 1)[1].split("\n== ", 1)[0].splitlines()[1:]
    assert "429s" in header and "rows refused" in header

    def cell(row: str, column: str) -> int:  # numbers are right-aligned under their header
        return int(row[: header.index(column) + len(column)].split()[-1].replace(",", ""))

    by_tenant = {row.split()[0]: row for row in rows if row.split() and row.split()[0] in TENANTS}
    assert set(by_tenant) == set(TENANTS), rows
    assert cell(by_tenant[r.quota_tenant], "429s") == r.quota_refused
    assert all(cell(row, "429s") == 0 for t, row in by_tenant.items() if t != r.quota_tenant)


def test_promotion_mid_traffic_fails_no_request(demo: Run) -> None:
    r = demo.result
    assert r.failures == [] and r.promotion_failures == []
    # Both answered month 6: the switch happened while its traffic flowed.
    assert set(r.promotion_answered_by) == {"fraud-v1", "fraud-v2"}, r.promotion_answered_by
    assert sum(r.promotion_answered_by.values()) == ROWS * len(TENANTS)
    assert r.shadow_scores >= ROWS * len(TENANTS)  # v2 saw every month-5 event as a shadow


def test_served_alert_rates_meet_the_references(demo: Run) -> None:
    fraud4, review4 = demo.result.month4
    assert (fraud4.intent, review4.intent) == ("fraud", "review")
    assert {r.tenant for r in fraud4.rows} == set(TENANTS)
    # v1 on month 4 (maps fitted on month 3), both intents; v2 on month 6 (maps fitted on month 5).
    bad = off_target(fraud4, "v1") + off_target(review4, "v1") + off_target(demo.result.after_promotion, "v2")
    assert bad == []


def test_v2_catches_more_fraud_at_the_same_thresholds(demo: Run) -> None:
    table = demo.result.after_promotion
    frauds = sum(r.frauds for r in table.rows if r.label == "v2")
    assert frauds >= 50, f"only {frauds} frauds among the events v2 answered: too few to compare"

    def caught(label: str) -> float:
        """Frauds at or above each edge, summed over edges and tenants."""
        return sum(x * r.frauds for r in table.rows if r.label == label for x in r.recall)

    v1, v2 = caught("v1"), caught("v2")
    assert v2 > v1, f"v2 caught {v2:.0f} (summed over edges), v1 {v1:.0f}"


def mean_error(table: RateTable) -> float:
    """Mean over tenants and edges of |alert rate - target| / target."""
    errors = [abs(a - t) / t for r in table.rows for a, t in zip(r.rates, table.targets)]
    return sum(errors) / len(errors)


def test_the_refresher_brings_drifted_alert_rates_back_on_target(demo: Run) -> None:
    r = demo.result
    assert r.stale is not None and r.refreshed is not None and r.failures == []
    # month 9 under month 5's maps is off; the refresher, from the score log alone, puts it back
    assert r.refresh_generation > 0 and f"in generation {r.refresh_generation}" in demo.output
    assert "refreshing fraud-v2 (drift:" in demo.output and "$ muse calib fit" not in demo.output.split("== 12.")[1]
    assert off_target(r.refreshed, "v2") == []
    assert mean_error(r.refreshed) < mean_error(r.stale) / 2, (mean_error(r.stale), mean_error(r.refreshed))
    # labels imported by the ids the server answered: status joins them and shows recall per tenant
    assert r.labels_imported > 0 and f"{r.labels_imported:,}" in demo.output.split("$ muse labels import")[1]
    status = demo.output.split("calib status --registry")[-2].split("== 14.")[0]
    assert "recall" in status and all(t in status for t in TENANTS)
