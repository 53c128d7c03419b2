"""`muse demo`: the whole story on simulated data, from nothing, in about a minute.

Each step runs the `muse` command a user would type, and prints it.  The modules:
``traffic`` (the simulated events), ``deployments`` (what is deployed, as Structs),
``client`` (tenants scoring over HTTP) and ``report`` (alert-rate and recall tables).
The story's outcome is also written to WORKDIR/result.json (a `DemoResult`)."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import pathlib
import shlex
import shutil
import time

import msgspec
import numpy as np
import polars as pl

from muse.calib import AlertRateCurve, ReferenceFile
from muse.calib.reference import encode_reference
from muse.calib.samples import query_score_log
from muse.core.deploy import DeploymentStore
from muse.core.registry import Registry
from muse.server import testing
from muse.server.testing import as_json_rows

from . import deployments, traffic
from .client import BATCH, CONCURRENCY, DemoClient, Scored
from .report import RateTable, format_table, offline_scores, rate_table

REFERENCE = AlertRateCurve([0.2, 0.5, 0.6, 0.8], [0.70, 0.35, 0.10, 0.05])
REVIEW = AlertRateCurve([0.5, 0.9], [0.05, 0.01])
BETA_V1 = 0.1  # negatives kept at training
BETA_V2 = 0.25
TENANTS = list(traffic.TENANTS)
LIGHTGBM = {
    "objective": "binary",
    "num_leaves": 31,
    "learning_rate": 0.05,
    "min_data_in_leaf": 40,
    "feature_fraction": 0.9,
    "verbose": -1,
    "num_threads": 2,
}
MONTH6_SECONDS = 5.0  # month 6 arrives over at least this long; v2 is promoted a fifth of the way in
BURST_REQUESTS = 40  # the limited tenant's burst: 2,560 events at once, over its 1,000-row burst
OTHERS_EVENTS = BURST_REQUESTS * BATCH  # per other tenant, meanwhile
OTHERS_SECONDS = 2.0  # over at least this long: more rows per second than the limited tenant may send


@dataclasses.dataclass
class DemoResult:
    """What the demo shows, as data: WORKDIR/result.json."""

    rows: int  # events per tenant per month
    trees: int
    month4: list[RateTable]  # v1 live, per intent
    shadow_scores: int  # v2's shadow scores of month 5 in the score log
    promotion_answered_by: dict[str, int]  # month 6, promoted mid-way: events per predictor
    promotion_failures: list[str]  # failed requests while promoting
    after_promotion: RateTable  # v1 (offline) and v2 (served) on the month-6 events v2 answered
    failures: list[str] = dataclasses.field(default_factory=list)  # every failed request
    # Quotas: one tenant's burst over its quota, the others' traffic meanwhile.  Its 429s are
    # expected (not failures); any other answer to it, and any failure of the others, are.
    quota_tenant: str = ""
    quota_refused: int = 0  # its requests refused (429)
    quota_answered: int = 0  # its requests answered (200)
    quota_others_requests: int = 0
    quota_others_failures: list[str] = dataclasses.field(default_factory=list)
    # Refresh: month 9 under v2's month-5 maps (first half), then under the maps the refresher
    # fitted from that half (second half); the labels imported, and the refresher's generation.
    stale: RateTable | None = None
    refreshed: RateTable | None = None
    labels_imported: int = 0
    refresh_generation: int = 0
    seconds: float = 0.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, compile, calibrate, deploy and serve built-in simulated data")
    p.add_argument("--workdir", default="demo-out", type=pathlib.Path)
    p.add_argument("--rows", type=int, default=40_000, help="events per tenant per month")
    p.add_argument("--trees", type=int, default=200, help=argparse.SUPPRESS)  # boosting rounds; fewer for tests
    p.set_defaults(func=cmd_demo)

    from . import cluster  # here, not at the top: it imports this module's pieces

    cluster.register(sub)


def cmd_demo(args: argparse.Namespace) -> int:
    result = run_demo(args.workdir, args.rows, args.trees)
    (args.workdir / "result.json").write_bytes(msgspec.json.format(msgspec.json.encode(result)))
    if result.failures:
        print(f"\ndemo: {len(result.failures)} requests failed, the first: {result.failures[0]}")
        return 1
    if not result.promotion_answered_by.get("fraud-v2"):
        print("\ndemo: month 6 ended before the server switched to v2; nothing to compare")
        return 1
    if not result.quota_refused:
        print(f"\ndemo: none of {result.quota_tenant}'s burst was refused (429): its quota was not enforced")
        return 1
    if not result.quota_answered:
        print(f"\ndemo: all of {result.quota_tenant}'s burst was refused: its burst allowance let nothing through")
        return 1
    return 0


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(command: str, quiet: bool = False, codes: tuple[int, ...] = (0,)) -> str:
    """Print ``muse COMMAND`` as a shell would take it, and run it; ``quiet``: return its
    output instead of printing it; ``codes``: the exit codes that are not a failure."""
    from muse.server.cli import main

    print(f"$ muse {command}", flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        code = main(shlex.split(command))
    if code not in codes:
        raise SystemExit(f"demo step failed (exit {code}): muse {command}")
    return out.getvalue()


def train_model(months: list[int], rows: int, path: pathlib.Path, seed: int, beta: float, trees: int) -> None:
    import lightgbm as lgb

    parts = [traffic.generate_mix(m, rows, seed=seed) for m in months]
    X = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    Xs, ys = traffic.undersample(X, y, beta, seed=seed)
    params = dict(LIGHTGBM, seed=seed)
    ds = lgb.Dataset(Xs, ys, feature_name=traffic.FEATURES, categorical_feature=["merchant_category"])
    lgb.train(params, ds, num_boost_round=trees).save_model(str(path))
    print(
        f"trained on months {months[0]}-{months[-1]}: {y.size} events, {int(y.sum())} frauds; "
        f"kept {ys.size} after keeping negatives with beta={beta}"
    )


def run_demo(work: pathlib.Path, rows: int, trees: int = 200) -> DemoResult:
    t0 = time.perf_counter()
    if work.exists() and any(work.iterdir()):
        if not (work / "registry").is_dir():
            raise ValueError(f"{work} is not empty and not a demo's workdir: choose another --workdir")
        shutil.rmtree(work)  # the previous run's
    registry = work / "registry"
    reg = Registry(registry)
    reg.references_dir.mkdir(parents=True)
    R = q(registry)

    step("1. Train model v1 on months 0-2 with negatives undersampled, and compile it")
    train_model([0, 1, 2], rows, work / "fraud_v1.txt", seed=1, beta=BETA_V1, trees=trees)
    run(f"compile {q(work / 'fraud_v1.txt')} --registry {R} --name fraud --beta {BETA_V1}")

    step("2. Declare each intent's reference distribution (alert rate at or above each edge)")
    reg.reference_path("fraud").write_bytes(encode_reference(ReferenceFile("fraud", REFERENCE, "card fraud")))
    reg.reference_path("review").write_bytes(encode_reference(ReferenceFile("review", REVIEW, "manual review")))
    print(reg.reference_path("fraud").read_text())

    step("3. Calibrate v1 per tenant on month 3 traffic, onto both references")
    X, _, tenants = traffic.generate_mix(3, rows, seed=7)
    margins = reg.load_model("fraud").predict(X, margin=True)
    pl.DataFrame({"tenant": tenants, "margin": margins}).write_parquet(work / "month3.parquet")
    for name, ref in (("fraud", "fraud"), ("fraud-review", "review")):
        run(
            f"calib fit --registry {R} --model fraud/1 --reference {ref} --name {name} "
            f"--scores {q(work / 'month3.parquet')} --by tenant"
        )

    step("4. Deploy v1 for two intents (both predictors share one loaded copy), add tenant keys, serve")
    run(f"deploy apply {q(deployments.write(deployments.V1, work / 'v1.toml'))} --registry {R}")
    keys = {t: run(f"keys add --registry {R} --tenant {t}", quiet=True).split()[-1] for t in TENANTS}
    # The log flushes every second here (default 10 s) so the demo can fit from it without waiting.
    with testing.LocalServer(registry, "--score-log-flush-seconds", "1") as server:
        print(f"$ muse serve --registry {R} --port {server.port} --score-log-flush-seconds 1")
        print(f"(serving; its output goes to {server.log_path})")
        client = DemoClient(server.port, keys)
        client.wait_generation(None)
        result = serve_and_compare(client, reg, work, rows, trees)
        # Leaving the block stops the server with SIGTERM: it flushes its score log before exiting.

    step("15. Server stopped (SIGTERM) and its score log flushed: is any live calibration drifting?")
    run(f"calib status --registry {R}", codes=(0, 1))  # 1 = some calibration drifted: news, not a failure
    result.seconds = time.perf_counter() - t0
    print(f"\ndemo finished in {result.seconds:.0f} s; registry in {registry}; results in {work / 'result.json'}")
    return result


def serve_and_compare(client: DemoClient, reg: Registry, work: pathlib.Path, rows: int, trees: int) -> DemoResult:
    R = q(reg.root)
    step("5. Month 4: every tenant scores over HTTP, on both intents")
    X4, y4, t4 = traffic.generate_mix(4, rows, seed=11)
    sample = {"tenant": t4[0], "intent": "fraud", "events": [{"id": "tx-1", "features": as_json_rows(X4[:1])[0]}]}
    print(f"POST /v1/score {json.dumps(sample)[:140]}...")
    print(f"  -> {json.dumps(client.score(sample)[1])}")
    started = time.perf_counter()
    fraud4 = client.score_all("fraud", X4, t4)
    review4 = client.score_all("review", X4, t4)
    elapsed = time.perf_counter() - started
    m = client.metrics()
    requests = sum(v for k, v in m.items() if k.startswith("muse_requests_total{"))
    calls = m.get('muse_batch_rows_count{model="fraud/1"}', 0)
    print(
        f"scored {2 * len(X4):,} events in {elapsed:.1f} s ({2 * len(X4) / elapsed:,.0f} events/s): "
        f"{requests:,.0f} requests of {BATCH} events, {CONCURRENCY} in flight, went out in {calls:,.0f} native calls"
    )
    month4 = [
        rate_table("fraud", REFERENCE, {"v1": fraud4.scores}, y4, t4, TENANTS),
        rate_table("review", REVIEW, {"v1": review4.scores}, y4, t4, TENANTS),
    ]
    for table in month4:
        print(format_table(table))

    step("6. Labels for month 4 arrive: train v2 on months 3-4 (a different keep-rate), compile it")
    train_model([3, 4], rows, work / "fraud_v2.txt", seed=2, beta=BETA_V2, trees=trees)
    run(f"compile {q(work / 'fraud_v2.txt')} --registry {R} --name fraud --beta {BETA_V2}")

    step("7. Deploy v2 as a shadow: it scores copies of live rows; callers still get v1")
    run(f"deploy apply {q(deployments.write(deployments.V2_SHADOW, work / 'v2-shadow.toml'))} --registry {R}")
    client.wait_generation(2)
    X5, _, t5 = traffic.generate_mix(5, rows, seed=13)
    fraud5 = client.score_all("fraud", X5, t5)
    print(f"month 5: {len(X5):,} events answered by {', '.join(sorted(set(fraud5.predictors) - {None}))}")
    dropped = client.metrics().get('muse_shadow_dropped_total{intent="fraud"}', 0)
    print(f"shadow work dropped because the shadow queue was full: {dropped:.0f} requests")
    scorelog = reg.root / "scorelog"
    shadow = wait_for_shadow_scores(scorelog, expected=len(X5) - int(dropped) * BATCH)
    files = len(list(scorelog.glob("*.parquet")))
    print(f"score log: {shadow:,} shadow scores of fraud-v2 in {files} Parquet files")

    step("8. Fit v2's quantile maps from its shadow scores in the log, per tenant")
    run(
        f"calib fit --registry {R} --model fraud/2 --reference fraud --name fraud "
        f"--scores {q(scorelog)} --predictor fraud-v2 --by tenant"
    )
    spec = deployments.write(deployments.V2_CALIBRATED_SHADOW, work / "v2-calibrated-shadow.toml")
    run(f"deploy apply {q(spec)} --registry {R}")
    client.wait_generation(3)

    step("9. Month 6 traffic flows; promote v2 in the middle of it")
    X6, y6, t6 = traffic.generate_mix(6, rows, seed=17)
    client.total = 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Spread over a few seconds at least, so that the switch (within a second) lands mid-traffic.
        scoring = pool.submit(client.score_all, "fraud", X6, t6, MONTH6_SECONDS)
        a_fifth = lambda: scoring.done() or (client.total and client.done >= client.total // 5)  # noqa: E731
        testing.wait_until(a_fifth, 120, "a fifth of month 6's requests to be answered")
        run(f"promote fraud-v2 --registry {R}")
        client.wait_generation(4)
        print(f"the server serves generation 4 after {client.done:,} of {client.total:,} requests")
        fraud6 = scoring.result()
    answered_by = {str(p): int((fraud6.predictors == p).sum()) for p in sorted(set(fraud6.predictors) - {None})}
    print(
        f"month 6: {len(X6):,} events in {fraud6.requests:,} requests, {len(fraud6.failures)} failed; answered by "
        + ", ".join(f"{p} ({n:,} events)" for p, n in answered_by.items())
    )

    step(
        "10. Before and after, on the month-6 events v2 answered: same thresholds, same alert rates, more fraud caught"
    )
    after = fraud6.predictors == "fraud-v2"
    v1 = offline_scores(reg, "fraud/1", "fraud/1", X6[after], t6[after])
    compared = rate_table("fraud", REFERENCE, {"v1": v1, "v2": fraud6.scores[after]}, y6[after], t6[after], TENANTS)
    print(format_table(compared, recall=True))
    print("(v1 here is the same library and maps the server used before, applied to the same events)")
    result = DemoResult(
        rows=rows,
        trees=trees,
        month4=month4,
        shadow_scores=shadow,
        promotion_answered_by=answered_by,
        promotion_failures=fraud6.failures,
        after_promotion=compared,
        failures=[*fraud4.failures, *review4.failures, *fraud5.failures, *fraud6.failures],
    )
    quotas(client, reg, work, X6, t6, result)
    refresh(client, reg, work, rows, result)
    return result


def quotas(
    client: DemoClient, reg: Registry, work: pathlib.Path, X: np.ndarray, tenants: np.ndarray, result: DemoResult
) -> None:
    """Step 11: one tenant on a quota bursts over it while the others send as usual."""
    R = q(reg.root)
    limited, quota = deployments.QUOTA_TENANT, deployments.QUOTA
    step(f"11. Quotas: {limited} may score {quota.rows_per_second or 0:,.0f} rows/s; it bursts, the others carry on")
    store = DeploymentStore(reg)
    generation = store.current_generation()
    assert generation is not None
    current = store.read(generation)
    if msgspec.structs.replace(current, description="") != msgspec.structs.replace(
        deployments.PROMOTED, description=""
    ):
        raise SystemExit(f"demo: generation {generation} is not the promoted deployment the quotas are added to")
    path = deployments.write(deployments.QUOTAS, work / "quotas.toml")
    text = path.read_text()
    start = text.index("quotas = [")
    print(f"{path}: generation {generation} as promoted, plus")
    print(text[start : text.index("]\n", start) + 1])
    run(f"deploy apply {q(path)} --registry {R}")
    client.wait_generation(generation + 1)

    others = [t for t in TENANTS if t != limited]
    pick = np.concatenate([np.flatnonzero(tenants == t)[:OTHERS_EVENTS] for t in others])
    mine = X[tenants == limited]
    client.total = 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        flowing: concurrent.futures.Future[Scored] = pool.submit(
            client.score_all, "fraud", X[pick], tenants[pick], OTHERS_SECONDS
        )
        started = lambda: flowing.done() or (client.total and client.done >= 1)  # noqa: E731
        testing.wait_until(started, 60, "the other tenants' traffic to flow")
        burst = client.burst(limited, "fraud", mine, BURST_REQUESTS)
        scored = flowing.result()

    refused, answered = burst.count(429), burst.count(200)
    print(
        f"{limited}: {burst.requests} requests of {BATCH} events at once ({burst.requests * BATCH:,} events, "
        f"its burst is {quota.burst_rows or 0:,} rows): {answered} answered (200), {refused} refused (429)"
        + (f", {len(burst.failures)} failed" if burst.failures else "")
    )
    if refused:
        print(f"  a refusal: 429, Retry-After: {burst.retry_after}, {burst.refused_example}")
    ok = scored.requests - len(scored.failures)
    print(
        f"{' and '.join(others)} meanwhile: {len(pick):,} events in {scored.requests} requests over "
        f"{OTHERS_SECONDS:.0f} s, {ok} answered (200)"
        + (f", {len(scored.failures)} failed: {scored.failures[0]}" if scored.failures else ", none refused")
    )
    # Every answered request is logged (--score-log-sample 1): once the last second is flushed,
    # the log's rows and the server's count agree.
    scored_rows = sum(v for k, v in client.metrics().items() if k.startswith("muse_events_scored_total{"))
    wait_for_logged(reg.root / "scorelog", "active", int(scored_rows), timeout=30)
    run(f"usage --registry {R} --metrics-url http://127.0.0.1:{client.port}")
    result.quota_tenant = limited
    result.quota_refused = refused
    result.quota_answered = answered
    result.quota_others_requests = scored.requests
    result.quota_others_failures = scored.failures
    result.failures += [*burst.failures, *scored.failures]


def refresh(client: DemoClient, reg: Registry, work: pathlib.Path, rows: int, result: DemoResult) -> None:
    """Steps 12-14: traffic drifts away from fraud-v2's maps; labels arrive after the fact; the
    refresher, not a person, refits the maps from the score log."""
    R = q(reg.root)
    step("12. Months go by and traffic drifts from v2's maps (fitted on month 5): add a refresh policy")
    X9, y9, t9 = traffic.generate_mix(9, rows, seed=19)
    first = (np.arange(len(t9)) % rows) < rows // 2  # each tenant's first half of month 9
    policy = msgspec.structs.replace(deployments.REFRESH, last=int(first.sum()))
    spec = msgspec.structs.replace(deployments.REFRESHED, refresh=[policy])
    path = deployments.write(spec, work / "refresh.toml")
    text = path.read_text()
    print(f"{path}: as promoted, without the quota, plus")
    print(text[text.index("[[refresh]]") :].strip())
    run(f"deploy apply {q(path)} --registry {R}")
    generation = DeploymentStore(reg).current_generation()
    assert generation is not None
    client.wait_generation(generation)

    step("13. Month 9, first half, under month 5's maps; then labels for 70% of its events arrive")
    stale = client.score_all("fraud", X9[first], t9[first])
    result.stale = rate_table("fraud", REFERENCE, {"v2": stale.scores}, y9[first], t9[first], TENANTS)
    print(format_table(result.stale))
    labelled = np.random.default_rng(23).random(int(first.sum())) < 0.7
    labels_file = work / "labels-month9.csv"
    pl.DataFrame({"event_id": stale.ids[labelled].astype(str), "label": y9[first][labelled]}).write_csv(labels_file)
    print(f"{labels_file}: event ids as the server answered them (`ids`), and whether each event was fraud")
    run(f"labels import {q(labels_file)} --registry {R}")
    scored_rows = sum(v for k, v in client.metrics().items() if k.startswith("muse_events_scored_total{"))
    wait_for_logged(reg.root / "scorelog", "active", int(scored_rows), timeout=30)
    run(f"calib status --registry {R} --labels", codes=(0, 1))
    result.labels_imported = int(labelled.sum())
    result.failures += stale.failures

    step("14. The refresher sees live alert rates off target and refits v2's maps; nobody runs calib fit")
    run(f"refresher --registry {R} --once")
    client.wait_generation(generation + 1)
    result.refresh_generation = generation + 1
    fresh = client.score_all("fraud", X9[~first], t9[~first])
    result.refreshed = rate_table("fraud", REFERENCE, {"v2": fresh.scores}, y9[~first], t9[~first], TENANTS)
    print("month 9, second half, under the refreshed maps:")
    print(format_table(result.refreshed, recall=True))
    result.failures += fresh.failures


def wait_for_shadow_scores(scorelog: pathlib.Path, expected: int, timeout: float = 60) -> int:
    """Shadow scoring runs behind the responses: wait until its rows reach the log."""
    return wait_for_logged(scorelog, "shadow", expected, timeout)


def wait_for_logged(scorelog: pathlib.Path, role: str, expected: int, timeout: float = 60) -> int:
    """Until the log holds at least ``expected`` rows of ``role`` (it is flushed every second)."""

    def enough() -> int:
        frame = query_score_log(scorelog, lambda scan: scan.filter(pl.col("role") == role).select(pl.len()))
        n = 0 if frame is None else int(frame.item())
        return n if n >= max(expected, 1) else 0

    return int(testing.wait_until(enough, timeout, f"{expected:,} {role} scores in {scorelog}", interval=0.2))


def q(path: str | pathlib.Path) -> str:
    """A path as a shell command line takes it."""
    return shlex.quote(str(path))
