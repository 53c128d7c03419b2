"""LightGBM categorical splits (category sets, not thresholds) through the
tree-blocked entry point: parity with LightGBM, unseen and missing categories included."""

from __future__ import annotations

import numpy as np
import pytest

from muse.compile import build_artifact, load_artifact


@pytest.fixture(scope="module")
def categorical_model(tmp_path_factory):
    import lightgbm as lgb  # a dev dependency: missing, the test fails rather than skips

    rng = np.random.default_rng(3)
    n = 3000
    X = np.column_stack([rng.integers(0, 30, n).astype(float), rng.normal(size=n), rng.normal(size=n)])
    risky = np.isin(X[:, 0], [2, 7, 11, 19, 23])
    y = ((risky & (X[:, 1] > -0.5)) | (rng.random(n) < 0.05)).astype(int)
    X[rng.random(n) < 0.05, 0] = np.nan
    params = {
        "objective": "binary",
        "num_leaves": 15,
        "min_data_in_leaf": 10,
        "verbose": -1,
        "seed": 1,
        "max_cat_to_onehot": 4,
        "cat_smooth": 1,
    }
    booster = lgb.train(params, lgb.Dataset(X, y, categorical_feature=[0]), num_boost_round=20)
    path = tmp_path_factory.mktemp("cat") / "cat.txt"
    booster.save_model(str(path))
    assert "cat_threshold" in path.read_text()  # the model really has categorical splits
    model = load_artifact(build_artifact(path, path.parent / "models", name="cat"))
    return booster, model


def test_categorical_parity(categorical_model):
    booster, model = categorical_model
    rng = np.random.default_rng(4)
    X = np.column_stack([rng.integers(-2, 40, 500).astype(float), rng.normal(size=500), rng.normal(size=500)])
    X[::17, 0] = np.nan  # missing category
    X[::23, 0] = 1e6  # far outside the categories seen in training
    for margin in (False, True):
        np.testing.assert_allclose(
            model.predict(X, margin=margin), booster.predict(X, raw_score=margin), rtol=0, atol=1e-9
        )
