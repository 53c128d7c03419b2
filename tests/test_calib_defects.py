"""Issue 16: `muse calib fit` / `report` on score logs of several predictors, versions written whole,
samples whose ties leave reference edges unreachable, argument checks, ensemble calibrations."""

from __future__ import annotations

import datetime

import numpy as np
import polars as pl
import pytest
from conftest import training_data
from helpers import CURVE
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from muse.calib import ReferenceFile, SampleError, alert_rates, correct_margins, fit_quantile_map, make_calibration
from muse.calib import artifact as calib_artifact
from muse.calib.quantile_map import MAX_EDGE_ERROR, edge_misses
from muse.compile import build_artifact
from muse.core.deploy import DeploymentStore
from muse.core.predictor import ensemble_identity
from muse.core.registry import Registry
from muse.core.snapshot import ModelPool, build_snapshot
from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec, SpecError
from muse.server.cli import main as cli
from muse.server.cli_calib import STATUS_TOLERANCE
from muse.server.scorelog import SCHEMA
from muse.server.testing import build_registry


@pytest.fixture
def reg(tmp_path, lgb_case):
    return build_registry(
        tmp_path / "reg", models={"lightgbm": lgb_case.artifact.parent}, references=[ReferenceFile("fraud", CURVE)]
    )


def log_frame(parts: dict[tuple[str, str], np.ndarray], *, column: str = "margin", roles=("active",)) -> pl.DataFrame:
    """A score-log-shaped frame: (predictor, version) -> its scores, tenants t0/t1 alternating."""
    frames = []
    for (predictor, version), values in parts.items():
        n = values.size
        frames.append(
            pl.DataFrame(
                {
                    "tenant": np.where(np.arange(n) % 2 == 0, "t0", "t1"),
                    "predictor": [predictor] * n,
                    "version": [version] * n,
                    "role": [roles[i % len(roles)] for i in range(n)],
                    column: values,
                }
            )
        )
    return pl.concat(frames)


def fit(reg, scores, *extra) -> int:
    args = ["calib", "fit", "--registry", str(reg.root), "--reference", "fraud", "--scores", str(scores)]
    return cli([*args, *extra])


def versions(reg, name="lightgbm") -> list[str]:
    directory = reg.calibrations_dir / name
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


RNG = np.random.default_rng(16)
V1 = RNG.logistic(-2.0, 1.5, 3000)  # two predictors' margins, far apart
V2 = RNG.logistic(-5.0, 0.5, 2000)


# -- 1. several predictors in one score file ------------------------------------------------------


def test_fit_refuses_to_pool_predictors(reg, tmp_path, capsys):
    log = tmp_path / "log.parquet"
    log_frame({("v1", "1"): V1, ("v2", "1"): V2}).write_parquet(log)
    assert fit(reg, log, "--model", "lightgbm") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{log}: holds the scores of 2 predictors (v1: 3,000 rows, v2: 2,000 rows); pass --predictor NAME" in err
    assert versions(reg) == []
    assert fit(reg, log, "--model", "lightgbm", "--predictor", "v1") == 0
    cal = reg.load_calibration("lightgbm")
    assert cal.sample_size == V1.size
    assert cal.quantile_map() == fit_quantile_map(correct_margins(V1, 0.25), CURVE)


def test_fit_pools_active_and_shadow_rows_of_one_predictor(reg, tmp_path, capsys):
    log = tmp_path / "log.parquet"
    log_frame({("v1", "1"): V1}, roles=("active", "shadow", "shadow")).write_parquet(log)
    assert fit(reg, log, "--model", "lightgbm") == 0  # one predictor: no --predictor needed
    assert "from 3000 scores (active 1000, shadow 2000)" in capsys.readouterr().out
    assert reg.load_calibration("lightgbm").sample_size == V1.size


def test_fit_refuses_to_pool_versions_of_one_predictor_name(reg, tmp_path, capsys):
    log = tmp_path / "log.parquet"
    log_frame({("v1", "1"): V1, ("v1", "2"): V2}).write_parquet(log)
    assert fit(reg, log, "--model", "lightgbm", "--predictor", "v1") == 2
    err = capsys.readouterr().err
    assert "predictor 'v1' has scores of 2 versions (1: 3,000 rows, 2: 2,000 rows); pass --predictor v1/VERSION" in err
    assert fit(reg, log, "--model", "lightgbm", "--predictor", "v1/2") == 0
    assert reg.load_calibration("lightgbm").sample_size == V2.size


def test_csv_with_a_predictor_column_counts_too(reg, tmp_path, capsys):
    csv = tmp_path / "scores.csv"
    log_frame({("a", "1"): V1, ("b", "1"): V2}).select("predictor", "margin").write_csv(csv)
    assert fit(reg, csv, "--model", "lightgbm") == 2
    assert "holds the scores of 2 predictors (a: 3,000 rows, b: 2,000 rows)" in capsys.readouterr().err


def report_rates(out: str) -> dict[float, list[float]]:
    """edge -> achieved rates per panel, from `muse calib report`'s table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].replace(".", "").isdigit():
            rows[float(parts[0])] = [float(p) for p in parts[2:]]
    return rows


def test_report_takes_one_predictor_of_a_log(reg, tmp_path, capsys):
    log = tmp_path / "log.parquet"
    log_frame({("v1", "1"): V1, ("v2", "1"): V2}).write_parquet(log)
    assert fit(reg, log, "--model", "lightgbm", "--predictor", "v1") == 0
    assert fit(reg, log, "--model", "lightgbm", "--predictor", "v2") == 0
    capsys.readouterr()
    base = ["calib", "report", "--registry", str(reg.root), "--scores", str(log), "--out", str(tmp_path / "r.png")]
    assert cli([*base, "--calibration", "lightgbm/1"]) == 2
    err = capsys.readouterr().err
    assert "holds the scores of 2 predictors (v1: 3,000 rows, v2: 2,000 rows); pass --predictor NAME" in err
    assert cli([*base, "--calibration", "lightgbm/1", "--predictor", "v1"]) == 0
    own = alert_rates(reg.load_calibration("lightgbm/1").quantile_map()(correct_margins(V1, 0.25)), CURVE.edges)
    rates = report_rates(capsys.readouterr().out)
    np.testing.assert_allclose([rates[e][0] for e in CURVE.edges], own, atol=1e-4)
    # the --compare side reads the same log: it needs its own predictor
    compare = [*base, "--calibration", "lightgbm/1", "--predictor", "v1", "--compare", "lightgbm/2"]
    assert cli(compare) == 2
    assert "pass --compare-predictor NAME" in capsys.readouterr().err
    assert cli([*compare, "--compare-predictor", "v2"]) == 0
    other = alert_rates(reg.load_calibration("lightgbm/2").quantile_map()(correct_margins(V2, 0.25)), CURVE.edges)
    rates = report_rates(capsys.readouterr().out)
    np.testing.assert_allclose([rates[e] for e in CURVE.edges], np.stack([own, other], axis=1), atol=1e-4)


# -- 2. a failed fit leaves no version ---------------------------------------------------------------


def test_failed_fit_creates_no_version(reg, tmp_path, capsys):
    log = tmp_path / "log.parquet"
    log_frame({("v1", "1"): V1}).write_parquet(log)
    assert fit(reg, log, "--model", "lightgbm", "--by", "nope") == 2
    assert versions(reg) == []
    err = capsys.readouterr().err
    assert f"--by nope: {log} has no such column (has: tenant, predictor, version, role, margin)" in err
    assert fit(reg, log, "--model", "lightgbm", "--by", "tenant") == 0
    assert versions(reg) == ["1"] and reg.calibration_tenants("lightgbm") == ["t0", "t1"]


def test_a_write_that_fails_midway_leaves_no_version(reg, tmp_path, monkeypatch):
    log = tmp_path / "log.parquet"
    log_frame({("v1", "1"): V1}).write_parquet(log)
    real = calib_artifact.write_calibration
    written = []

    def failing(cal, path):
        if cal.tenant == "t1":  # after the all-traffic map and tenant t0 are on disk
            raise OSError(28, "No space left on device")
        written.append(path)
        return real(cal, path)

    monkeypatch.setattr("muse.core.registry.write_calibration", failing)
    assert fit(reg, log, "--model", "lightgbm", "--by", "tenant") == 2
    assert len(written) == 2
    assert list((reg.calibrations_dir / "lightgbm").iterdir()) == []  # no version, no staging folder
    assert reg.next_calibration_version("lightgbm") == "1"


def test_a_leftover_staging_folder_is_no_version(reg, tmp_path):
    cal = make_calibration(
        fit_quantile_map(correct_margins(V1, 0.25), CURVE),
        name="lightgbm",
        version="1",
        model=calib_artifact.ModelIdentity("lightgbm", "1", "ab" * 32),
        reference_name="fraud",
        reference=CURVE,
        beta=0.25,
        sample_size=V1.size,
    )
    crashed = reg.calibrations_dir / "lightgbm" / ".staging-1-4242-0badf00d"
    calib_artifact.write_calibration(cal, crashed / "calibration.json")  # a crash before the rename
    assert reg.next_calibration_version("lightgbm") == "1"
    with pytest.raises(LookupError, match="'lightgbm' is not in"):
        reg.load_calibration("lightgbm")
    path = reg.publish_calibration([cal])
    assert path == reg.calibrations_dir / "lightgbm" / "1" and reg.load_calibration("lightgbm") == cal
    with pytest.raises(FileExistsError, match="calibration lightgbm/1 already exists"):
        reg.publish_calibration([cal])


def test_an_existing_version_is_refused_before_fitting(reg, tmp_path, capsys):
    log = tmp_path / "log.parquet"
    log_frame({("v1", "1"): V1}).write_parquet(log)
    assert fit(reg, log, "--model", "lightgbm", "--version", "3") == 0
    before = (reg.calibrations_dir / "lightgbm" / "3" / "calibration.json").read_bytes()
    assert fit(reg, log, "--model", "lightgbm", "--version", "3", "--by", "tenant") == 2
    assert "calibration lightgbm/3 already exists" in capsys.readouterr().err
    assert (reg.calibrations_dir / "lightgbm" / "3" / "calibration.json").read_bytes() == before
    assert not (reg.calibrations_dir / "lightgbm" / "3" / "tenants").exists()


# -- 3. ties that leave an edge unreachable ------------------------------------------------------


def corrected_log(tmp_path, scores) -> str:
    path = tmp_path / "scores.parquet"
    pl.DataFrame({"corrected": scores}).write_parquet(path)
    return str(path)


def test_all_equal_scores_are_refused(reg, tmp_path, capsys):
    log = corrected_log(tmp_path, np.full(2000, 0.3))
    assert fit(reg, log, "--model", "lightgbm") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{log}: the sample's 2000 scores take 1 distinct value (0.3); " in err
    assert "the map cannot reach alert rate 0.35 at edge 0.5 (the nearest a monotone map gets is 0.0000" in err
    assert versions(reg) == []


def test_ninety_percent_tied_scores_are_refused(reg, tmp_path, capsys):
    scores = np.concatenate([np.zeros(1800), np.random.default_rng(1).beta(1, 3, 200)])
    assert fit(reg, corrected_log(tmp_path, scores), "--model", "lightgbm") == 2
    err = capsys.readouterr().err
    assert "90.0% of the sample's 2000 scores are tied at 0; the map cannot reach alert rate 0.35 at edge 0.5" in err
    assert "nearest a monotone map gets is 0.1000, 71% off, beyond 50%" in err
    assert versions(reg) == []


def test_a_tie_across_an_edge_warns_when_off_beyond_the_status_tolerance(reg, tmp_path, capsys):
    rng = np.random.default_rng(2)
    # levels [0.93, 0.99) hold one value: edge 0.8 (5% at or above) gets 7% (40% off) or 1%
    scores = np.concatenate([rng.uniform(0.0, 0.5, 9300), np.full(600, 0.6), rng.uniform(0.7, 1.0, 100)])
    assert fit(reg, corrected_log(tmp_path, scores), "--model", "lightgbm") == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1, captured.err
    assert "at edge 0.8 the map alerts on 0.0700 for a target of 0.05 (40% off;" in warnings[0]
    assert "6.0% of the sample's 10000 scores are tied at 0.6" in warnings[0]
    assert "  0.8      0.0500   0.0700" in captured.out
    assert versions(reg) == ["1"]


def test_a_tied_tenant_falls_back_to_the_all_traffic_map(reg, tmp_path, capsys):
    rng = np.random.default_rng(3)
    frame = pl.DataFrame(
        {
            "tenant": ["ok"] * 3000 + ["stuck"] * 1500,
            "corrected": np.concatenate([rng.beta(1, 4, 3000), np.full(1500, 0.2)]),
        }
    )
    frame.write_parquet(tmp_path / "scores.parquet")
    assert fit(reg, tmp_path / "scores.parquet", "--model", "lightgbm", "--by", "tenant") == 0
    out = capsys.readouterr().out
    assert "tenant stuck: skipped, uses the all-traffic map (the sample's 1500 scores take 1 distinct value" in out
    assert reg.calibration_tenants("lightgbm") == ["ok"]


@st.composite
def continuous_with_a_few_ties(draw):
    """A normal sample: continuous scores, a few of them (up to 2%) occurring twice."""
    n = draw(st.integers(1000, 5000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = rng.beta(draw(st.floats(0.3, 5)), draw(st.floats(0.5, 30)), size=n)
    pairs = draw(st.integers(0, n // 50))
    s[:pairs] = s[pairs : 2 * pairs]
    return s


@settings(max_examples=60, deadline=None)
@given(continuous_with_a_few_ties())
def test_normal_samples_are_neither_refused_nor_warned(s):
    qmap = fit_quantile_map(s, CURVE, max_edge_error=MAX_EDGE_ERROR)
    assert edge_misses(s, qmap, CURVE, STATUS_TOLERANCE) == []


def nearest_reachable(s: np.ndarray, target: float) -> float:
    """The alert rate nearest ``target`` that any non-decreasing map of ``s`` can give: ties alert
    together, so only the fractions at or above each distinct value (or none) are possible."""
    _, counts = np.unique(s, return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)[:-1]])
    tails = np.append((s.size - below) / s.size, 0.0)
    return float(tails[np.argmin(np.abs(tails - target))])


@st.composite
def tied_samples(draw):
    """Continuous scores plus one point mass of 5-95% of the sample at a random level."""
    n = draw(st.integers(500, 4000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = rng.beta(draw(st.floats(0.3, 5)), draw(st.floats(0.5, 30)), size=n)
    mass = int(n * draw(st.floats(0.05, 0.95)))
    s[:mass] = np.quantile(s, draw(st.floats(0.0, 1.0)))
    return s


@settings(max_examples=150, deadline=None)
@given(tied_samples())
def test_a_sample_is_refused_exactly_when_ties_put_an_edge_out_of_reach(s):
    slack = 1.0 / s.size
    worst = max(abs(nearest_reachable(s, t) - t) - MAX_EDGE_ERROR * t - slack for t in CURVE.rates)
    assume(abs(worst) > 1e-9)  # not on the boundary, where rounding decides
    if worst > 0:
        with pytest.raises(SampleError, match=r"the map cannot reach alert rate [0-9.]+ at edge [0-9.]+ \("):
            fit_quantile_map(s, CURVE, min_samples=100, max_edge_error=MAX_EDGE_ERROR)
    else:
        qmap = fit_quantile_map(s, CURVE, min_samples=100, max_edge_error=MAX_EDGE_ERROR)
        warned = {m.edge for m in edge_misses(s, qmap, CURVE, STATUS_TOLERANCE)}
        off = {
            e
            for e, t in zip(CURVE.edges, CURVE.rates)
            if abs(nearest_reachable(s, t) - t) > STATUS_TOLERANCE * t + slack
        }
        assert warned == off
        # the fit gets as near each target as any map can (ties broken either way)
        achieved = alert_rates(qmap(s), CURVE.edges)
        for t, got in zip(CURVE.rates, achieved):
            assert abs(got - t) <= abs(nearest_reachable(s, t) - t) + 1e-12


# -- 4. argument checks and help -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-5"])
def test_min_samples_below_one_is_refused(reg, tmp_path, capsys, value):
    log = tmp_path / "log.parquet"
    log_frame({("v1", "1"): V1}).write_parquet(log)
    assert fit(reg, log, "--model", "lightgbm", "--min-samples", value) == 2
    err = capsys.readouterr().err
    assert f"--min-samples {value}: a map is fitted from at least 1 score; give a whole number >= 1" in err
    assert versions(reg) == []


def test_library_refuses_min_samples_below_one_and_empty_samples():
    with pytest.raises(ValueError, match="min_samples must be a whole number >= 1, got 0"):
        fit_quantile_map(np.linspace(0, 1, 10), CURVE, min_samples=0)
    with pytest.raises(SampleError, match="score sample is empty"):
        fit_quantile_map(np.array([]), CURVE, min_samples=1)


def test_fit_help_says_which_beta_corrects_margins(capsys):
    with pytest.raises(SystemExit):
        cli(["calib", "fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "model manifest's beta, the negative keep-rate given to `muse compile --beta` (default 1" in out
    assert "(default 1000; at least 1)" in out


# -- 5. an ensemble predictor's calibration, fitted from its score-log rows ------------------------


@pytest.fixture(scope="module")
def half_model(tmp_path_factory, lgb_case):
    """The lightgbm case's model compiled again with another keep-rate (beta 0.5, not 0.25)."""
    return build_artifact(lgb_case.source, tmp_path_factory.mktemp("compiled"), name="lgb-half", beta=0.5)


@pytest.fixture
def ensemble_reg(tmp_path, lgb_case, half_model):
    return build_registry(
        tmp_path / "reg",
        models={"lightgbm": lgb_case.artifact.parent, "lgb-half": half_model.parent},
        references=[ReferenceFile("fraud", CURVE)],
    )


ENS = PredictorSpec("ens", "3", "fraud", ["lightgbm/1", "lgb-half/1"], combine="mean_logit")
SINGLE = PredictorSpec("single", "1", "fraud", ["lightgbm/1"])
LIVE = DeploymentSpec(predictors=[SINGLE, ENS], routes=[RouteSpec("*", "fraud", "single", ["ens"])])


def logged_rows(reg: Registry, X: np.ndarray) -> pl.DataFrame:
    """What the score log holds for X scored by the live deployment's predictors (server/recording.py
    logs each predictor's Scores: an ensemble's are its combined ones)."""
    snap = build_snapshot(LIVE, ModelPool(reg), generation=1)
    now = datetime.datetime.now(datetime.timezone.utc)
    frames = []
    for p, role in ((snap.predictors["single"], "active"), (snap.predictors["ens"], "shadow")):
        s = p.score(X, 0)
        n = len(X)
        frames.append(
            pl.DataFrame(
                {
                    "time": [now] * n,
                    "tenant": ["acme"] * n,
                    "intent": ["fraud"] * n,
                    "predictor": [p.name] * n,
                    "version": [p.version] * n,
                    "role": [role] * n,
                    "generation": [1] * n,
                    "margin": s.margin,
                    "corrected": s.corrected,
                    "mapped": s.mapped,
                },
                schema=SCHEMA,
            )
        )
    return pl.concat(frames)


def test_ensemble_predictor_is_calibrated_from_its_log_rows(ensemble_reg, tmp_path, capsys):
    reg = ensemble_reg
    DeploymentStore(reg).apply(LIVE)
    X, _ = training_data(rows=4000, seed=40)
    frame = logged_rows(reg, X)
    (tmp_path / "log").mkdir()
    frame.write_parquet(tmp_path / "log" / "scores-1.parquet")
    # an earlier version of predictor ens (other models, other scores) is in the log too: not these
    earlier = frame.filter(pl.col("predictor") == "ens").with_columns(
        pl.lit("2").alias("version"), pl.col("corrected") / 2
    )
    earlier.write_parquet(tmp_path / "log" / "scores-0.parquet")
    ens_rows = frame.filter(pl.col("predictor") == "ens")["corrected"].to_numpy()
    args = ["calib", "fit", "--registry", str(reg.root), "--scores", str(tmp_path / "log"), "--min-samples", "500"]
    # a member model is not the ensemble: its rows are no map for lightgbm/1
    assert cli([*args, "--predictor", "ens", "--model", "lightgbm/1"]) == 2
    assert (
        "--model lightgbm/1: predictor ens in the current deployment (generation 1) runs lightgbm/1 + lgb-half/1"
        in (capsys.readouterr().err)
    )
    assert cli([*args, "--predictor", "ens"]) == 0
    out = capsys.readouterr().out
    assert "fitted ens/1 for ensemble ens/3 (lightgbm/1 + lgb-half/1, mean_logit) onto reference fraud" in out
    cal = reg.load_calibration("ens/1")
    manifests = [reg.load_model(r).manifest for r in ENS.models]
    assert cal.model == ensemble_identity("ens", "3", manifests, "mean_logit") and cal.beta == 1.0
    assert cal.sample_size == ens_rows.size and cal.reference_name == "fraud"
    assert cal.quantile_map() == fit_quantile_map(ens_rows, CURVE)
    report = ["calib", "report", "--registry", str(reg.root), "--calibration", "ens/1", "--predictor", "ens/3"]
    report += ["--scores", str(tmp_path / "log"), "--out", str(tmp_path / "ens.png")]
    assert cli(report) == 0  # on its 'corrected' column
    assert cli([*report, "--column", "margin"]) == 2
    assert "its 'margin' column needs the model of calibration ens/1, ens/3 (sha256" in capsys.readouterr().err
    # the deployment accepts it, and serves the ensemble's scores through it
    calibrated = DeploymentSpec(
        predictors=[SINGLE, PredictorSpec("ens", "3", "fraud", ENS.models, calibration="ens/1")],
        routes=[RouteSpec("*", "fraud", "ens")],
    )
    DeploymentStore(reg).validate(calibrated)
    ens = build_snapshot(calibrated, ModelPool(reg), generation=2).predictors["ens"]
    served = ens.score(X, ens.maps[None])
    np.testing.assert_allclose(served.corrected, ens_rows, rtol=1e-12)
    np.testing.assert_allclose(served.mapped, cal.quantile_map()(ens_rows), rtol=0, atol=1e-12)
    # ... and a single model's calibration would not do for it
    assert cli([*args, "--predictor", "single", "--name", "single-cal"]) == 0
    assert reg.load_calibration("single-cal").model.name == "lightgbm"
    with pytest.raises(SpecError, match="was fitted for model lightgbm/1"):
        DeploymentStore(reg).validate(
            DeploymentSpec(
                predictors=[PredictorSpec("ens", "3", "fraud", ENS.models, calibration="single-cal/1")],
                routes=[RouteSpec("*", "fraud", "ens")],
            )
        )


def test_ensemble_from_features_is_fitted_on_its_combined_scores(ensemble_reg, tmp_path, capsys):
    reg = ensemble_reg
    DeploymentStore(reg).apply(LIVE)
    X, _ = training_data(rows=3000, seed=41)
    names = reg.load_model("lightgbm/1").manifest.feature_names
    pl.DataFrame({n: X[:, i] for i, n in enumerate(names)}).write_parquet(tmp_path / "features.parquet")
    args = ["calib", "fit", "--registry", str(reg.root), "--predictor", "ens", "--min-samples", "500"]
    assert cli([*args, "--features", str(tmp_path / "features.parquet")]) == 0, capsys.readouterr().err
    assert "fitted ens/1 for ensemble ens/3" in capsys.readouterr().out
    combined = logged_rows(reg, X).filter(pl.col("predictor") == "ens")["corrected"].to_numpy()
    cal = reg.load_calibration("ens/1")
    assert cal.quantile_map() == fit_quantile_map(combined, CURVE) and cal.sample_size == X.shape[0]
    manifests = [reg.load_model(r).manifest for r in ENS.models]
    assert cal.model == ensemble_identity("ens", "3", manifests, "mean_logit")
    assert cli(["calib", "fit", "--registry", str(reg.root), "--predictor", "gone", "--scores", "x"]) == 2
    assert "--predictor gone: not in the registry's current deployment (generation" in capsys.readouterr().err


def test_a_calibration_fitted_with_another_beta_is_refused(reg):
    """The map was fitted on scores corrected with the calibration's beta; serving corrects with
    the model's: a mismatch maps every score off its reference."""
    from muse.calib import ModelIdentity

    model = reg.load_model("lightgbm")
    m = model.manifest
    X, _ = training_data(rows=2000, seed=3)
    corrected = correct_margins(model.predict(X, margin=True), 0.5)
    cal = make_calibration(
        fit_quantile_map(corrected, CURVE),
        name="lightgbm",
        version="1",
        model=ModelIdentity(m.name, m.version, m.library_sha256),
        reference_name="fraud",
        reference=CURVE,
        beta=0.5 if m.beta != 0.5 else 0.25,
        sample_size=corrected.size,
    )
    reg.save_calibration(cal)
    spec = DeploymentSpec(
        predictors=[PredictorSpec("p", "1", "fraud", ["lightgbm/1"], calibration="lightgbm/1")],
        routes=[RouteSpec("*", "fraud", "p")],
    )
    with pytest.raises(SpecError, match=r"corrected with beta .* refit it"):
        build_snapshot(spec, ModelPool(reg), 1)
