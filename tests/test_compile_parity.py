"""Compiled models score exactly like the library that trained them."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
from conftest import FEATURES, training_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muse.compile.frontends import load_source_model

_thresholds: dict[str, list[float]] = {}


def thresholds(case) -> list[float]:
    if case.kind not in _thresholds:
        doc = json.loads(load_source_model(case.source).model.dump_as_json())
        values = {n["threshold"] for t in doc["trees"] for n in t["nodes"] if "threshold" in n}
        _thresholds[case.kind] = sorted(values)
    return _thresholds[case.kind]


def nan_allowed(case) -> bool:
    return case.kind != "sklearn-gb"  # GradientBoostingClassifier refuses NaN itself


def inf_allowed(case) -> bool:
    # sklearn and XGBoost refuse inf (and, for XGBoost, anything past float32) in predict.
    return case.kind == "lightgbm"


@st.composite
def matrices(draw, case):
    ths = thresholds(case)
    special = [0.0, -0.0, 1e-36, -1e-36, 1e-35, 5e-324, 3.4e38, -3.4e38]
    if nan_allowed(case):
        special.append(math.nan)
    if inf_allowed(case):
        special += [math.inf, -math.inf, 1e300, -1e300]
    on_threshold = st.sampled_from(ths) if ths else st.just(0.0)
    value = st.one_of(
        on_threshold,
        on_threshold.map(lambda t: float(np.nextafter(t, np.inf))),
        on_threshold.map(lambda t: float(np.nextafter(t, -np.inf))),
        on_threshold.map(lambda t: float(np.nextafter(np.float32(t), np.float32(np.inf)))),
        st.sampled_from(special),
        st.floats(-5, 5, allow_nan=False),
    )
    rows = draw(st.integers(1, 40))
    data = draw(st.lists(value, min_size=rows * FEATURES, max_size=rows * FEATURES))
    return np.array(data, dtype=np.float64).reshape(rows, FEATURES)


def margin_tolerance(case) -> float:
    """XGBoost's and LightGBM's margins are bit-identical (MUSE adds what they add, in their order
    and precision: for XGBoost float32, tree by tree, from its base margin); scikit-learn's sum in
    another order, within 1e-12.  Probabilities within 1e-6 (each its own exp())."""
    return 0.0 if case.kind.startswith(("xgboost", "lightgbm")) else 1e-12


def check_parity(case, X):
    for margin in (False, True):
        got = case.model.predict(X, margin=margin)
        want = np.asarray(case.reference(X, margin), dtype=np.float64)
        np.testing.assert_allclose(
            got,
            want,
            rtol=0,
            atol=margin_tolerance(case) if margin else 1e-6,
            err_msg=f"{case.kind} margin={margin} X={X.tolist() if len(X) < 4 else X.shape}",
        )


def test_parity_on_training_distribution(case):
    X, _ = training_data(rows=2000, seed=5, nan=nan_allowed(case))
    check_parity(case, X)


def test_parity_float32_input(case):
    X, _ = training_data(rows=500, seed=6, nan=nan_allowed(case))
    X32 = X.astype(np.float32)
    np.testing.assert_allclose(case.model.predict(X32), case.reference(X32, False), atol=1e-6)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_parity_hypothesis(case, data):
    check_parity(case, data.draw(matrices(case)))


def test_manifest_describes_model(case):
    m = case.model.manifest
    assert m.num_feature == FEATURES and len(m.feature_names) == FEATURES
    assert m.beta == 0.25
    assert m.margin_kind == ("probability" if case.kind in ("sklearn-rf", "sklearn-et") else "logit")
    assert m.library_file.startswith(f"lib{case.kind}-{m.version}-")
    assert (case.artifact / m.library_file).is_file()
    # What these tests check: the predicated walk (LightGBM, XGBoost), or for scikit-learn the
    # if/else generator's tree-blocked entry point.
    predicated = case.kind.startswith(("lightgbm", "xgboost"))
    assert ("-DMUSE_PREDICATED" if predicated else "-DMUSE_BLOCKED") in m.compiler_flags


def test_scores_do_not_depend_on_batch_composition(case):
    """Tree blocking changes the order of work, not of each row's additions: bitwise equal."""
    X, _ = training_data(rows=150, seed=8, nan=nan_allowed(case))
    whole = case.model.predict(X, margin=True)
    one_by_one = np.concatenate([case.model.predict(X[i : i + 1], margin=True) for i in range(len(X))])
    odd_blocks = np.concatenate([case.model.predict(X[i : i + 37], margin=True) for i in range(0, len(X), 37)])
    assert whole.tobytes() == one_by_one.tobytes() == odd_blocks.tobytes()


def test_concurrent_scoring_matches_serial(lgb_case):
    X, _ = training_data(rows=3000, seed=9)
    expected = lgb_case.model.predict(X)
    results, errors = [None] * 8, []

    def worker(i):
        try:
            for _ in range(20):
                out = lgb_case.model.predict(X[i::8])
                assert np.array_equal(out, expected[i::8])
            results[i] = True
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results)


def test_empty_batch(lgb_case):
    out = lgb_case.model.predict(np.empty((0, FEATURES)))
    assert out.shape == (0,) and out.dtype == np.float64


def test_non_contiguous_and_integer_inputs(lgb_case):
    X, _ = training_data(rows=100, seed=3, nan=False)
    wide = np.repeat(X, 2, axis=1)[:, ::2]  # a strided view
    np.testing.assert_array_equal(lgb_case.model.predict(wide), lgb_case.model.predict(X))
    ints = np.round(X).astype(np.int64)
    np.testing.assert_array_equal(lgb_case.model.predict(ints), lgb_case.model.predict(ints.astype(np.float64)))


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (np.zeros((3, FEATURES + 1)), ValueError, "7 columns; the model expects 6"),
        (np.zeros(FEATURES), ValueError, "2-D"),
        (np.zeros((2, 2, FEATURES)), ValueError, "2-D"),
        (np.array([["a"] * FEATURES]), TypeError, "numeric"),
        (np.array([[object()] * FEATURES]), TypeError, "numeric"),
    ],
)
def test_bad_matrices_are_refused(lgb_case, bad, error, words):
    with pytest.raises(error, match=words):
        lgb_case.model.predict(bad)
