"""The score transformation: properties of correction, references, fitted maps and kernels."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from muse import calib
from muse.calib import AlertRateCurve, QuantileTable, SampleError, fit_quantile_map

PAPER_CURVE = AlertRateCurve([0.2, 0.5, 0.6, 0.8], [0.70, 0.35, 0.10, 0.05])
betas = st.floats(1e-4, 1.0, exclude_min=False)
margins = hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(-40, 40))
probabilities = hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(0, 1))


@st.composite
def curves(draw):
    k = draw(st.integers(1, 6))
    edges = sorted(e / 1000 for e in draw(st.lists(st.integers(1, 999), min_size=k, max_size=k, unique=True)))
    rates = sorted(draw(st.lists(st.floats(0.001, 1.0), min_size=k, max_size=k)), reverse=True)
    return AlertRateCurve(edges, rates).validate()


@st.composite
def samples(draw, min_size=50, max_size=3000, ties=True):
    n = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    a, b = draw(st.floats(0.2, 5)), draw(st.floats(0.5, 30))
    s = rng.beta(a, b, size=n)
    if ties and draw(st.booleans()):
        s = np.round(s, draw(st.integers(1, 3)))  # point masses
    return s


# --- level 1 -------------------------------------------------------------------


@given(margins, betas)
def test_margin_correction_is_a_logit_shift(m, beta):
    p = calib.correct_margins(m, beta)
    assert ((p >= 0) & (p <= 1)).all()
    inside = (p > 1e-9) & (p < 1 - 1e-6)  # logit of p is ill-conditioned near 1
    logit = np.log(p[inside]) - np.log1p(-p[inside])
    np.testing.assert_allclose(logit, m[inside] + math.log(beta), rtol=0, atol=1e-8)


@given(probabilities, betas)
def test_probability_correction_matches_formula_and_inverts(p, beta):
    c = calib.correct_probabilities(p, beta)
    np.testing.assert_allclose(c, beta * p / (1 - (1 - beta) * p), rtol=1e-12, atol=0)
    np.testing.assert_allclose(calib.undo_correction(c, beta), p, rtol=1e-9, atol=1e-15)


@given(margins, probabilities)
def test_beta_one_is_identity(m, p):
    np.testing.assert_array_equal(calib.correct_probabilities(p, 1.0), p)
    np.testing.assert_allclose(calib.correct_margins(m, 1.0), 1 / (1 + np.exp(-m)), rtol=1e-15)  # 2 ulp of libm


@given(margins, betas)
def test_margin_and_probability_forms_agree(m, beta):
    p_s = 1 / (1 + np.exp(-m))
    np.testing.assert_allclose(calib.correct_margins(m, beta), calib.correct_probabilities(p_s, beta), atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, -0.1, 1.5, float("nan")])
def test_bad_beta_refused(beta):
    with pytest.raises(ValueError, match="beta"):
        calib.correct_margins(np.zeros(3), beta)


# --- references ----------------------------------------------------------------


@pytest.mark.parametrize(
    "edges, rates, words",
    [
        ([0.2, 0.5, 0.4], [0.7, 0.3, 0.1], r"edges\[2\] = 0.4 must be greater than edges\[1\] = 0.5"),
        ([0.2, 0.5], [0.3, 0.4], r"rates\[1\] = 0.4 at edge 0.5 exceeds rates\[0\] = 0.3"),
        ([0.2, 1.0], [0.3, 0.1], r"edges\[1\] = 1.0 must lie strictly between 0 and 1"),
        ([0.2, 0.5], [0.3, 0.0], r"rates\[1\] = 0.0 \(at edge 0.5\) must be in \(0, 1\]"),
        ([0.2], [0.3, 0.1], "1 edges but 2 rates"),
        ([], [], "at least one edge"),
        ([0.5, 0.5000001], [0.3, 0.1], r"edges\[1\] = 0.5000001 is within 1e-06 of edges\[0\]"),
    ],
)
def test_alert_rate_curve_validation_names_entry(edges, rates, words):
    with pytest.raises(calib.ReferenceError, match=words):
        AlertRateCurve(edges, rates).validate()


def test_quantile_table_validation_names_entry():
    with pytest.raises(calib.ReferenceError, match=r"values\[2\] = 0.1 is below values\[1\] = 0.3"):
        QuantileTable([0.1, 0.5, 0.9], [0.05, 0.3, 0.1]).validate()
    with pytest.raises(calib.ReferenceError, match=r"probabilities\[1\] = 0.1 must be greater"):
        QuantileTable([0.1, 0.1], [0.05, 0.3]).validate()


def test_reference_file_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "ref.toml"
    bad.write_text('name = "fraud"\n[reference]\nkind = "alert_rate"\nedges = [0.5, 0.2]\nrates = [0.3, 0.1]\n')
    with pytest.raises(calib.ReferenceError, match=r"ref.toml: edges\[1\] = 0.2"):
        calib.load_reference(str(bad))
    bad.write_text('name = "fraud"\n[reference]\nkind = "alert_rate"\nedges = "high"\nrates = [0.3]\n')
    with pytest.raises(calib.ReferenceError, match=r"ref.toml: Expected `array`, got `str` - at `\$.reference.edges`"):
        calib.load_reference(str(bad))


def test_inverse_cdf_hits_edges_and_takes_higher_edge_at_jumps():
    np.testing.assert_allclose(calib.inverse_cdf(PAPER_CURVE, [0.3, 0.65, 0.9, 0.95]), [0.2, 0.5, 0.6, 0.8])
    flat = AlertRateCurve([0.4, 0.6], [0.1, 0.1]).validate()
    assert calib.inverse_cdf(flat, [0.9])[0] == 0.6


def test_quantile_table_from_scores_reproduces_rates():
    rng = np.random.default_rng(3)
    incumbent = rng.beta(0.4, 9, size=50_000)
    table = QuantileTable.from_scores(incumbent)
    other = rng.gamma(2, size=50_000)
    other = other / (other.max() * 1.01)
    qmap = fit_quantile_map(other, table)
    mapped = qmap(other)
    for q in (0.5, 0.9, 0.99):
        assert abs(np.quantile(mapped, q) - np.quantile(incumbent, q)) < 0.01


# --- fitted maps ---------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(samples(), curves(), hnp.arrays(np.float64, 100, elements=st.floats(-0.5, 1.5)))
def test_maps_are_monotone_and_land_in_unit_interval(s, curve, probe):
    qmap = fit_quantile_map(s, curve, min_samples=10)
    out = qmap(np.sort(probe))
    assert ((out >= 0) & (out <= 1)).all()
    assert (np.diff(out) >= 0).all()
    assert (np.diff(qmap.xs) > 0).all() and (np.diff(qmap.ys) >= 0).all()


@settings(max_examples=60, deadline=None)
@given(samples(ties=False), curves())
def test_fit_reproduces_target_alert_rates_on_its_sample(s, curve):
    qmap = fit_quantile_map(s, curve, min_samples=10)
    achieved = calib.alert_rates(qmap(s), curve.edges)
    assert np.abs(achieved - np.array(curve.rates)).max() <= 1.0 / s.size + 1e-12


@settings(max_examples=40, deadline=None)
@given(st.integers(200, 3000), st.integers(0, 2**32 - 1), curves())
def test_two_models_on_same_traffic_get_same_alert_rates(n, seed, curve):
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    model_a = 1 / (1 + np.exp(-(2 * signal - 4 + rng.normal(size=n))))  # different score
    model_b = 1 / (1 + np.exp(-(0.5 * signal - 1 + rng.normal(size=n) * 0.3)))  # distributions
    rates_a = calib.alert_rates(fit_quantile_map(model_a, curve, 10)(model_a), curve.edges)
    rates_b = calib.alert_rates(fit_quantile_map(model_b, curve, 10)(model_b), curve.edges)
    assert np.abs(rates_a - rates_b).max() <= 2.0 / n + 1e-12


@given(samples(), curves())
@settings(max_examples=30, deadline=None)
def test_fit_is_deterministic_and_order_free(s, curve):
    a = fit_quantile_map(s, curve, min_samples=10)
    b = fit_quantile_map(np.random.default_rng(0).permutation(s), curve, min_samples=10)
    assert a == b


def test_point_mass_maps_to_middle_of_its_interval():
    # 40% of the sample sits exactly at 0.01: it maps to F_ref^-1(0.2), the middle of [0, 0.4].
    s = np.concatenate([np.full(400, 0.01), np.linspace(0.02, 0.99, 600)])
    ref = QuantileTable([0.0, 1.0], [0.0, 1.0]).validate()  # uniform reference: F^-1(q) = q
    qmap = fit_quantile_map(s, ref, min_samples=10)
    assert qmap(np.array([0.01]))[0] == pytest.approx(0.2)


def test_scores_outside_fitted_range_run_to_the_unit_corners():
    s = np.linspace(0.1, 0.5, 2000)
    qmap = fit_quantile_map(s, PAPER_CURVE, min_samples=10)
    lo, hi = qmap(np.array([0.1, 0.5]))
    assert qmap(np.array([0.05]))[0] == pytest.approx(lo / 2)  # halfway from (0, 0)
    assert qmap(np.array([0.75]))[0] == pytest.approx(hi + (1 - hi) / 2)  # halfway to (1, 1)
    assert qmap(np.array([0.0, 1.0])).tolist() == [0.0, 1.0]
    assert qmap(np.array([-3.0, 7.0])).tolist() == [0.0, 1.0]
    assert np.isnan(qmap(np.array([np.nan]))[0])


@pytest.mark.parametrize(
    "sample, words",
    [
        (np.full(50, 0.5), "50 scores, fewer than the minimum 1000"),
        (np.array([0.1] * 2000 + [np.nan]), "1 NaN scores"),
        (np.linspace(-2, 2, 2000), "outside \\[0, 1\\]"),
    ],
)
def test_bad_samples_refused(sample, words):
    with pytest.raises(SampleError, match=words):
        fit_quantile_map(sample, PAPER_CURVE)


def test_all_equal_sample_still_gives_a_valid_map():
    qmap = fit_quantile_map(np.full(2000, 0.3), PAPER_CURVE)
    assert qmap(np.array([0.3]))[0] == pytest.approx(calib.inverse_cdf(PAPER_CURVE, [0.5])[0])


# --- kernels -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(samples(max_size=500), min_size=1, max_size=4), curves(), st.data())
def test_mixed_batch_kernel_matches_scalar_reference(sample_list, curve, data):
    maps = [fit_quantile_map(s, curve, min_samples=10) for s in sample_list]
    table = calib.MapTable(maps)
    n = data.draw(st.integers(0, 300))
    scores = data.draw(hnp.arrays(np.float64, n, elements=st.floats(-0.2, 1.2)))
    index = data.draw(hnp.arrays(np.int64, n, elements=st.integers(0, len(maps) - 1)))
    got = table.apply(scores, index)
    want = [np.interp(s, maps[i].xs, maps[i].ys) for s, i in zip(scores, index)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_fused_calibration_equals_two_steps():
    rng = np.random.default_rng(4)
    maps = [fit_quantile_map(rng.beta(1, 9, 3000), PAPER_CURVE), fit_quantile_map(rng.beta(2, 5, 3000), PAPER_CURVE)]
    table = calib.MapTable(maps)
    raw = rng.normal(-2, 2, size=1000)
    idx = rng.integers(0, 2, size=1000)
    corrected, mapped = table.calibrate(raw, idx, beta=0.1, margin_kind="logit")
    np.testing.assert_allclose(corrected, calib.correct_margins(raw, 0.1), atol=1e-15)
    np.testing.assert_allclose(mapped, table.apply(corrected, idx), atol=1e-15)
    probs = 1 / (1 + np.exp(-raw))
    corrected_p, _ = table.calibrate(probs, idx, beta=0.1, margin_kind="probability")
    np.testing.assert_allclose(corrected_p, corrected, atol=1e-12)


def test_map_table_rejects_bad_index():
    table = calib.MapTable([calib.identity_map()])
    with pytest.raises(IndexError):
        table.apply(np.zeros(2), np.array([0, 1]))


# --- samples and per-tenant fits --------------------------------------------------


def test_samples_from_every_source_agree(tmp_path):
    rng = np.random.default_rng(5)
    s = rng.beta(1, 8, 2000)
    pl.DataFrame({"score": s}).write_parquet(tmp_path / "s.parquet")
    pl.DataFrame({"score": s}).write_csv(tmp_path / "s.csv")
    base = fit_quantile_map(s, PAPER_CURVE)
    for source in (pl.Series(s), pl.DataFrame({"score": s}), tmp_path / "s.parquet", tmp_path / "s.csv"):
        assert fit_quantile_map(calib.read_scores(source), PAPER_CURVE) == base
    with pytest.raises(SampleError, match="no column 'mapped'"):
        calib.read_scores(tmp_path / "s.parquet", column="mapped")


def test_fit_per_tenant_in_one_pass_skips_small_tenants():
    rng = np.random.default_rng(6)
    frame = pl.DataFrame(
        {
            "tenant": ["a"] * 3000 + ["b"] * 2000 + ["tiny"] * 10,
            "score": np.concatenate([rng.beta(1, 9, 3000), rng.beta(3, 4, 2000), rng.random(10)]),
        }
    )
    fit = calib.fit_per_group(frame, PAPER_CURVE, by="tenant")
    assert set(fit.maps) == {"a", "b"} and "tiny" in fit.skipped and fit.sizes["tiny"] == 10
    for tenant in ("a", "b"):
        scores = frame.filter(pl.col("tenant") == tenant)["score"].to_numpy()
        assert fit.maps[tenant] == fit_quantile_map(scores, PAPER_CURVE)


# --- artifacts -------------------------------------------------------------------


def _calibration():
    qmap = fit_quantile_map(np.random.default_rng(7).beta(1, 9, 3000), PAPER_CURVE)
    return calib.make_calibration(
        qmap,
        name="fraud-v1",
        version="1",
        model=calib.ModelIdentity("fraud", "1", "ab" * 32),
        reference_name="fraud",
        reference=PAPER_CURVE,
        beta=0.1,
        sample_size=3000,
        window=("2026-01-01T00:00:00Z", "2026-01-31T00:00:00Z"),
    ), qmap


def test_calibration_round_trip(tmp_path):
    cal, qmap = _calibration()
    path = calib.write_calibration(cal, tmp_path / "cal.json")
    loaded = calib.read_calibration(path)
    assert loaded == cal and loaded.quantile_map() == qmap
    with pytest.raises(FileExistsError):
        calib.write_calibration(cal, path)


def test_tampered_calibration_refused(tmp_path):
    cal, _ = _calibration()
    path = calib.write_calibration(cal, tmp_path / "cal.json")
    path.write_text(path.read_text().replace('"beta": 0.1', '"beta": 0.2'))
    with pytest.raises(calib.CalibrationError, match="checksum mismatch"):
        calib.read_calibration(path)
    path.write_text(path.read_text()[:100])
    with pytest.raises(calib.CalibrationError, match="not a valid calibration"):
        calib.read_calibration(path)
