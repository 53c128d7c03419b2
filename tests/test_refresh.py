"""Calibration refresh (muse.core.refresh): the plan's guardrails on constructed samples, and
refreshes against a registry whose score log is written here, row by row under our control.
The refresher under live load: tests/test_live_updates.py."""

from __future__ import annotations

import datetime
import json
import threading

import msgspec
import numpy as np
import polars as pl
import pytest
from helpers import CURVE, calibrated_registry
from hypothesis import given, settings
from hypothesis import strategies as st

from muse.calib import ModelIdentity, alert_rates, correct_margins, fit_quantile_map, identity_map, make_calibration
from muse.core.deploy import DeploymentStore, GenerationConflict
from muse.core.locks import refresh_lock
from muse.core.refresh import RefreshError, due, refresh
from muse.core.refresh_plan import LiveMaps, plan_refresh
from muse.core.spec import DeploymentSpec, PredictorSpec, RefreshSpec, RouteSpec, SpecError, decode_spec
from muse.server.cli import main as cli
from muse.server.cli_refresh import Refresher
from muse.server.scorelog import FILE_SCHEMA, SCHEMA
from muse.server.testing import deploy

EDGES = [e for e, _ in zip(CURVE.edges, CURVE.rates)]
NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone.utc)
P = PredictorSpec("p", "1", "fraud", ["lightgbm/1"], calibration="p-cal/1")


def policy(**kw) -> RefreshSpec:
    return RefreshSpec(**{"predictor": "p", "every": "1d", "min_samples": 500, **kw})


def window(scores: np.ndarray, end: datetime.datetime = NOW, tenants: list[str] | None = None) -> pl.DataFrame:
    """Rows spread evenly over the hour before ``end``, in order."""
    n = scores.size
    times = [end - datetime.timedelta(seconds=3600 * (n - i) / n) for i in range(n)]
    return pl.DataFrame(
        {"time": times, "tenant": tenants or ["acme"] * n, "corrected": scores},
        schema={"time": pl.Datetime("us", "UTC"), "tenant": pl.String, "corrected": pl.Float64},
    )


# -- the plan --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(a=st.floats(0.3, 5.0), b=st.floats(0.3, 5.0), seed=st.integers(0, 2**16))
def test_a_stationary_window_refits_onto_every_target(a, b, seed):
    scores = np.random.default_rng(seed).beta(a, b, 20_000)
    plan = plan_refresh("p", window(scores), CURVE, LiveMaps(identity_map()), policy(max_shift=100))
    assert plan.ok, plan.overall.problems
    assert plan.overall.qmap is not None
    achieved = alert_rates(plan.overall.qmap(scores), EDGES)
    np.testing.assert_allclose(achieved, CURVE.rates, rtol=0.02, atol=1.0 / scores.size)


def test_a_window_whose_newest_rows_left_it_behind_is_refused():
    rng = np.random.default_rng(1)
    # the newest fifth scores far higher than the rest: a map fitted on all of it misses now
    scores = np.concatenate([rng.beta(2, 5, 16_000), rng.beta(5, 2, 4_000)])
    plan = plan_refresh("p", window(scores), CURVE, LiveMaps(identity_map()), policy(max_shift=100))
    assert not plan.ok
    assert any("tolerance" in p for p in plan.overall.problems)


def test_a_jump_beyond_max_shift_is_refused_and_within_it_accepted():
    rng = np.random.default_rng(2)
    before = rng.beta(2, 5, 20_000)
    live = LiveMaps(plan_refresh("p", window(before), CURVE, LiveMaps(identity_map()), policy()).overall.qmap)
    jumped = rng.beta(4, 3, 20_000)  # the same model now scores everyone far higher
    plan = plan_refresh("p", window(jumped), CURVE, live, policy(max_shift=0.5))
    assert not plan.ok and any("max_shift" in p for p in plan.overall.problems)
    moved = [e for e in plan.overall.edges if e.shift > 0.5]
    assert moved and all(e.live > e.new for e in moved)  # the live map alerts far too often
    assert plan_refresh("p", window(jumped), CURVE, live, policy(max_shift=100)).ok


def test_too_few_rows_and_tied_samples_are_refused_with_the_reason():
    plan = plan_refresh("p", window(np.linspace(0, 1, 100)), CURVE, LiveMaps(identity_map()), policy())
    assert not plan.ok and "fewer than min_samples 500" in plan.overall.problems[0]
    tied = np.full(5_000, 0.3)
    plan = plan_refresh("p", window(tied), CURVE, LiveMaps(identity_map()), policy())
    assert not plan.ok and plan.overall.problems


def test_tenant_maps_are_judged_apart():
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.beta(2, 5, 6_000), rng.beta(3, 3, 300)])
    tenants = ["acme"] * 6_000 + ["small"] * 300
    order = rng.permutation(scores.size)  # interleaved in time
    frame = window(scores[order], tenants=[tenants[i] for i in order])
    plan = plan_refresh("p", frame, CURVE, LiveMaps(identity_map()), policy(by="tenant", max_shift=100))
    by = {c.tenant: c for c in plan.tenants}
    assert plan.ok and by["acme"].ok and by["acme"].rows == 6_000
    assert "small" not in by and plan.small_tenants == 1  # too few rows, no map of its own: counted
    live = LiveMaps(identity_map(), {"small": identity_map()})  # with a map of its own: judged, refused
    plan = plan_refresh("p", frame, CURVE, live, policy(by="tenant", max_shift=100))
    small = {c.tenant: c for c in plan.tenants}["small"]
    assert not small.ok and "fewer than min_samples" in small.problems[0] and plan.small_tenants == 0


# -- the registry side ---------------------------------------------------------------------


def model_scores(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Corrected scores as a big model gives them (continuous; the suite's small models tie a
    lot), logits moved by ``shift``: drift."""
    return correct_margins(logit(np.random.default_rng(seed).beta(2, 5, n)) + shift, 1.0)


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


@pytest.fixture
def reg(tmp_path, model_dir):
    """P serves lightgbm/1 with calibration p-cal/1: fitted on model_scores, all traffic and acme."""
    reg = calibrated_registry(tmp_path, model_dir)
    m = reg.load_model("lightgbm/1").manifest
    common = dict(name="p-cal", version="1", model=ModelIdentity(m.name, m.version, m.library_sha256))
    common.update(reference_name="fraud", reference=CURVE, beta=m.beta)
    cals = [
        make_calibration(fit_quantile_map(model_scores(5_000, seed), CURVE), sample_size=5_000, tenant=t, **common)
        for t, seed in ((None, 100), ("acme", 101))
    ]
    reg.publish_calibration(cals)
    deploy(reg, DeploymentSpec(predictors=[P], routes=[RouteSpec("*", "fraud", "p")]))
    return reg


def write_log(
    reg, scores: np.ndarray, generation: int, *, tenants=None, end=NOW, predictor="p", name="a", ids=False
) -> None:
    """A score-log file of ``scores`` served by ``predictor`` at ``generation`` (mapped by its live
    map); with ``ids``, in today's schema (event and request ids), else in the schema before them."""
    frame = window(scores, end, tenants)
    n = frame.height
    mapped = reg.load_calibration("p-cal/1").quantile_map()(scores)
    log = frame.with_columns(
        intent=pl.lit("fraud"),
        predictor=pl.lit(predictor),
        version=pl.lit("1"),
        role=pl.lit("active"),
        generation=pl.lit(generation, pl.Int64),
        margin=pl.lit(0.0),
        mapped=pl.Series(mapped),
    ).select(list(SCHEMA.names()))
    if ids:
        log = log.with_columns(request_id=pl.lit("r1"), event_id=pl.int_range(n).cast(pl.String))
    directory = reg.root / "scorelog"
    directory.mkdir(exist_ok=True)
    log.cast(FILE_SCHEMA if ids else SCHEMA).write_parquet(directory / f"scores-{name}.parquet")


def audit_records(reg) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((reg.root / "audit").glob("*.json"))]


def test_refresh_publishes_a_calibration_and_a_generation_that_switches_the_predictor(reg):
    store = DeploymentStore(reg)
    base = store.current_generation()
    scores = model_scores(4_000, seed=5, shift=0.8)  # the model now scores higher: drift
    tenants = ["acme" if i % 4 else "globex" for i in range(scores.size)]
    write_log(reg, scores, base, tenants=tenants)
    live = reg.load_calibration("p-cal/1").quantile_map()
    before = alert_rates(live(scores), EDGES)
    assert abs(before[-1] - 0.05) > 0.02  # the live map is off at the 0.8 edge

    out = refresh(reg, "p", policy(by="tenant", max_shift=100), now=NOW)

    assert out.outcome == "published", out.maps
    assert out.generation == base + 1 and store.current_generation() == base + 1
    spec = store.read(out.generation)
    assert spec.predictors[0].calibration == out.calibration == "p-cal/2"
    new = reg.load_calibration("p-cal/2")
    assert new.model == reg.load_calibration("p-cal/1").model and new.sample_size == scores.size
    np.testing.assert_allclose(alert_rates(new.quantile_map()(scores), EDGES), CURVE.rates, atol=0.02)
    # acme had a map and enough rows: refitted; globex (1,000 rows) too; nothing else carried
    assert reg.calibration_tenants("p-cal/2") == ["acme", "globex"]
    [record] = audit_records(reg)
    assert record["outcome"] == "published" and record["generation"] == base + 1 and record["rows"] == scores.size
    assert record["maps"][0]["edges"][-1]["before"] == pytest.approx(
        float(np.mean(live(scores[-800:]) >= 0.8)), abs=1e-9
    )


def test_a_refused_tenant_map_keeps_the_previous_one(reg):
    base = DeploymentStore(reg).current_generation()
    scores = model_scores(3_000, seed=6)
    tenants = ["globex"] * (scores.size - 100) + ["acme"] * 100  # acme: too few rows for its own map
    write_log(reg, scores, base, tenants=tenants)
    out = refresh(reg, "p", policy(by="tenant", max_shift=100), now=NOW)
    assert out.outcome == "published"
    outcomes = {m.tenant: m.outcome for m in out.maps}
    assert outcomes == {None: "fitted", "globex": "fitted", "acme": "kept previous"}
    kept, old = reg.load_calibration("p-cal/2", "acme"), reg.load_calibration("p-cal/1", "acme")
    assert (kept.knots_x, kept.knots_y, kept.created_at) == (old.knots_x, old.knots_y, old.created_at)
    assert (kept.name, kept.version) == ("p-cal", "2")


def test_a_refused_refresh_publishes_nothing_and_is_audited(reg):
    store = DeploymentStore(reg)
    base = store.current_generation()
    write_log(reg, model_scores(300, seed=7), base)
    out = refresh(reg, "p", policy(), now=NOW)
    assert out.outcome == "refused" and store.current_generation() == base
    assert not (reg.calibrations_dir / "p-cal" / "2").exists()
    [record] = audit_records(reg)
    assert record["outcome"] == "refused" and "fewer than min_samples" in record["reasons"][0]


def test_dry_run_and_windows(reg):
    store = DeploymentStore(reg)
    base = store.current_generation()
    write_log(reg, model_scores(2_000, seed=8), base, end=NOW - datetime.timedelta(days=3), name="old")
    write_log(reg, model_scores(1_000, seed=9), base, name="new", ids=True)  # beside files from before ids
    write_log(reg, model_scores(1_000, seed=9), base, predictor="other", name="other")
    assert refresh(reg, "p", policy(window="1d"), now=NOW, dry_run=True).plan.rows == 1_000
    assert refresh(reg, "p", policy(window="7d"), now=NOW, dry_run=True).plan.rows == 3_000
    assert refresh(reg, "p", policy(last=1_500), now=NOW, dry_run=True).plan.rows == 1_500
    # rows logged after `now` are not in the window
    assert refresh(reg, "p", policy(window="7d"), now=NOW - datetime.timedelta(days=1), dry_run=True).plan.rows == 2_000
    assert store.current_generation() == base and not (reg.root / "audit").exists()
    with pytest.raises(RefreshError, match="'nope' is not in the current deployment"):
        refresh(reg, "nope", policy(), now=NOW)


def test_due_by_schedule_and_by_drift(reg):
    generation = DeploymentStore(reg).current_generation()
    created = datetime.datetime.fromisoformat(reg.load_calibration("p-cal/1").created_at)
    soon = created + datetime.timedelta(hours=1)
    assert due(reg, policy(), P, generation, created + datetime.timedelta(days=2)) == "schedule"
    assert due(reg, policy(), P, generation, soon) is None  # no live rows yet: nothing to judge
    write_log(reg, model_scores(2_000, seed=10), generation, end=soon)
    assert due(reg, policy(), P, generation, soon) is None  # the same distribution the map was fitted on
    write_log(reg, model_scores(2_000, seed=11, shift=1.0), generation, name="b", end=soon)
    assert due(reg, policy(), P, generation, soon).startswith("drift: edge")
    # judged on the policy's window: drifted rows older than it are history
    assert due(reg, policy(window="1h"), P, generation, soon + datetime.timedelta(hours=2)) is None
    assert due(reg, policy(), P, generation + 1, soon) is None  # judged on the generation's own rows


def test_publishing_after_a_generation_is_compare_and_swap(reg):
    store = DeploymentStore(reg)
    base = store.current_generation()
    spec = store.read(base)
    assert store.publish(spec, after=base) == base + 1
    with pytest.raises(GenerationConflict, match=f"generation {base + 1} was published after generation {base}"):
        store.publish(spec, after=base)
    assert store.current_generation() == base + 1
    # a publisher that died between writing its file and moving `current` wedges nothing
    store.path(base + 2).write_bytes(store.path(base + 1).read_bytes())
    assert store.publish(spec, after=base + 1) == base + 3 and store.current_generation() == base + 3
    # a plain apply in between: the derived publish refuses, `current` stays on the newest
    assert store.publish(spec) == base + 4
    with pytest.raises(GenerationConflict):
        store.publish(spec, after=base + 3)
    assert store.current_generation() == base + 4 == max(store.generations())


def test_the_refresh_lock_admits_one_holder(reg):
    with refresh_lock(reg):
        with pytest.raises(TimeoutError, match="holds the registry's refresh lock"), refresh_lock(reg, wait=0.1):
            pass
        got = threading.Event()

        def take():
            with refresh_lock(reg, wait=30):
                got.set()

        t = threading.Thread(target=take)
        t.start()
    t.join(30)
    assert got.is_set()


def test_refresh_policies_are_validated_with_the_deployment():
    base = b'[[predictors]]\nname="p"\nversion="1"\nintent="fraud"\nmodels=["m/1"]\n'
    base += b'[[routes]]\ntenant="*"\nintent="fraud"\nactive="p"\n'
    spec = decode_spec(base + b'[[refresh]]\npredictor="p"\nevery="1h"\nlast=5000\n', "d.toml")
    assert spec.refresh[0].window_text is None and spec.refresh[0].last == 5000
    for extra, message in [
        (b'[[refresh]]\npredictor="q"\nevery="1h"\n', "refresh[0]: predictor 'q' is not defined"),
        (b'[[refresh]]\npredictor="p"\nevery="soon"\n', "$.refresh[0].every"),
        (b'[[refresh]]\npredictor="p"\nevery="1h"\nwindow="1d"\nlast=5\n', "not both"),
        (b'[[refresh]]\npredictor="p"\nevery="1h"\ntolerance=0\n', "$.refresh[0].tolerance"),
        (b'[[refresh]]\npredictor="p"\nevery="1h"\n[[refresh]]\npredictor="p"\nevery="2h"\n', "two refresh policies"),
    ]:
        with pytest.raises(SpecError, match=message.replace("$", r"\$").replace("[", r"\[").replace("]", r"\]")):
            decode_spec(base + extra, "d.toml")


def test_cli_refresh_and_the_refresher(reg, capsys):
    store = DeploymentStore(reg)
    spec = msgspec.structs.replace(store.read(store.current_generation()), refresh=[policy(max_shift=100)])
    base = deploy(reg, spec)
    write_log(reg, model_scores(300, seed=12), base)
    code = cli(["calib", "refresh", "--registry", str(reg.root), "--predictor", "p", "--since", "3650d"])
    assert code == 1 and "refused: nothing published" in capsys.readouterr().out  # the policy's min_samples
    code = cli(["calib", "refresh", "--registry", str(reg.root), "--predictor", "p", "--since", "3650d", "--dry-run",
                "--min-samples", "100"])  # fmt: skip
    assert code == 0 and "dry run: nothing published" in capsys.readouterr().out
    assert cli(["calib", "refresh", "--registry", str(reg.root), "--predictor", "p", "--since", "soon"]) == 2
    assert "--since 'soon': not a duration" in capsys.readouterr().err

    # live rows far off target at the current generation: the refresher refreshes now (drift)
    write_log(reg, model_scores(3_000, seed=13, shift=1.0), base, name="b", end=datetime.datetime.now(datetime.UTC))
    [out] = Refresher(reg, None).run_once()
    assert out.outcome == "published" and out.generation == base + 1
    assert audit_records(reg)[-1]["trigger"] == "drift"
    assert store.read(base + 1).refresh == spec.refresh  # the policy carries over
    assert Refresher(reg, None).run_once() == []  # the new generation has no rows yet: not due


def test_a_calibration_switched_while_fitting_is_not_overwritten_and_the_failure_is_audited(reg, monkeypatch):
    store = DeploymentStore(reg)
    base = store.current_generation()
    write_log(reg, model_scores(3_000, seed=20), base)
    publish = reg.publish_calibration

    def meanwhile(cals):  # someone deploys p uncalibrated while the refresh fits
        spec = store.read(store.current_generation())
        store.publish(msgspec.structs.replace(spec, predictors=[msgspec.structs.replace(P, calibration=None)]))
        return publish(cals)

    monkeypatch.setattr(reg, "publish_calibration", meanwhile)
    with pytest.raises(RefreshError, match=r"changed predictor p .* calibration None"):
        refresh(reg, "p", policy(max_shift=100), now=NOW)
    assert store.read(store.current_generation()).predictors[0].calibration is None  # theirs stands
    [record] = audit_records(reg)
    assert (
        record["outcome"] == "failed"
        and record["calibration"] == "p-cal/2"
        and "changed predictor" in record["reasons"][0]
    )


def test_tenant_maps_not_refitted_are_kept_only_when_still_valid(reg):
    store = DeploymentStore(reg)
    base = store.current_generation()
    write_log(reg, model_scores(3_000, seed=21), base, tenants=["globex"] * 3_000)  # acme: no rows
    # without by = "tenant" the policy fits no tenant maps: acme's is dropped, and said so
    out = refresh(reg, "p", policy(max_shift=100), now=NOW)
    assert {m.tenant: m.outcome for m in out.maps} == {None: "fitted", "acme": "dropped"}
    assert reg.calibration_tenants(out.calibration) == []
    # with it, acme's map (no rows to refit it) is carried over unchanged ...
    out = refresh(reg, "p", policy(by="tenant", max_shift=100), now=NOW)
    assert {m.tenant: m.outcome for m in out.maps}["globex"] == "fitted"
    assert reg.calibration_tenants(out.calibration) == ["globex"]  # acme's was dropped by the refresh before
    # ... unless it maps onto another reference than the new version's (here: an edited reference)
    deploy(reg, store.read(base))  # p on p-cal/1 again, acme's map in it
    path = reg.reference_path("fraud")
    path.write_text(path.read_text().replace("0.05", "0.04"))
    out = refresh(reg, "p", policy(by="tenant", max_shift=100, tolerance=1.0), now=NOW)
    assert out.outcome == "published" and {m.tenant: m.outcome for m in out.maps}["acme"] == "dropped"


def test_the_window_leaves_out_generations_that_ran_the_version_with_other_models(reg):
    store = DeploymentStore(reg)
    base = store.current_generation()
    spec = store.read(base)
    other = store.publish(
        msgspec.structs.replace(spec, predictors=[msgspec.structs.replace(P, models=["lightgbm-copy/1"])])
    )
    store.publish(spec)
    write_log(reg, model_scores(1_000, seed=22), base, name="same")
    write_log(reg, model_scores(1_000, seed=23), other, name="other")
    assert refresh(reg, "p", policy(), now=NOW, dry_run=True).plan.rows == 1_000


def test_an_unreadable_score_log_file_is_a_one_line_error(reg, capsys):
    (reg.root / "scorelog").mkdir()
    (reg.root / "scorelog" / "scores-zz.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(RefreshError, match=r"cannot read the score log .* move the unreadable file out"):
        refresh(reg, "p", policy(), now=NOW)
    assert cli(["calib", "refresh", "--registry", str(reg.root), "--predictor", "p"]) == 2
    assert "cannot read the score log" in capsys.readouterr().err
    assert cli(["calib", "refresh", "--registry", str(reg.root / "typo"), "--predictor", "p"]) == 2
    assert "no such directory" in capsys.readouterr().err and not (reg.root / "typo").exists()
