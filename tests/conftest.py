"""Shared fixtures: small models of every supported format, compiled once per session."""

from __future__ import annotations

import pathlib
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from muse.compile import build_artifact, load_artifact

# First calls JIT-compile or load libraries: wall-clock deadlines would only measure that.
settings.register_profile("muse", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("muse")
FEATURES = 6


def training_data(rows: int = 600, seed: int = 0, nan: bool = True):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, FEATURES))
    X[:, 0] = np.round(X[:, 0] * 2)  # ties on thresholds
    y = ((X[:, 0] + X[:, 1] * X[:, 2] + rng.normal(size=rows)) > 1.0).astype(np.int32)
    if nan:
        X[rng.random(X.shape) < 0.08] = np.nan
    return X, y


def _lightgbm(path):
    import lightgbm as lgb

    X, y = training_data()
    params = {"objective": "binary", "num_leaves": 7, "min_data_in_leaf": 5, "verbose": -1, "seed": 1}
    booster = lgb.train(params, lgb.Dataset(X, y), num_boost_round=12)
    booster.save_model(str(path))
    return lambda Z, margin: booster.predict(Z, raw_score=margin)


def _lightgbm_fine(path):
    """More trees and leaves on more rows: scores with few ties, as a real model's (fitting maps
    from served traffic needs them: the small models tie so much that the guardrails refuse)."""
    import lightgbm as lgb

    X, y = training_data(rows=3000, seed=3)
    params = {"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 5, "verbose": -1, "seed": 1}
    booster = lgb.train(params, lgb.Dataset(X, y), num_boost_round=40)
    booster.save_model(str(path))
    return lambda Z, margin: booster.predict(Z, raw_score=margin)


def _xgboost(path):
    import xgboost as xgb

    X, y = training_data()
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3, "seed": 1}, xgb.DMatrix(X, y), 12)
    booster.save_model(str(path))
    return lambda Z, margin: booster.predict(xgb.DMatrix(Z), output_margin=margin)


def _sklearn(kind):
    def make(path):
        from sklearn import ensemble

        cls = getattr(ensemble, kind)
        nan_ok = kind != "GradientBoostingClassifier"
        X, y = training_data(nan=nan_ok)
        extra = {"max_iter": 12} if kind.startswith("Hist") else {"n_estimators": 12, "max_depth": 3}
        est = cls(random_state=1, **extra).fit(X, y)
        path.write_bytes(pickle.dumps(est))

        def predict(Z, margin):
            # scikit-learn checks its input is finite by summing it, which overflows (a RuntimeWarning
            # from numpy) on the parity tests' rows of +-3.4e38: not a problem of ours, and not shown.
            with np.errstate(over="ignore", invalid="ignore"):
                if margin and hasattr(est, "decision_function"):
                    return est.decision_function(Z)
                return est.predict_proba(Z)[:, 1]

        return predict

    return make


MAKERS = {
    "lightgbm": ("model.txt", _lightgbm),
    "xgboost-json": ("model.json", _xgboost),
    "xgboost-ubj": ("model.ubj", _xgboost),
    "sklearn-gb": ("gb.pkl", _sklearn("GradientBoostingClassifier")),
    "sklearn-hgb": ("hgb.pkl", _sklearn("HistGradientBoostingClassifier")),
    "sklearn-rf": ("rf.pkl", _sklearn("RandomForestClassifier")),
    "sklearn-et": ("et.pkl", _sklearn("ExtraTreesClassifier")),
}
# Built on demand for the tests that need them, outside the parity tests' parameters.
EXTRA_MAKERS = {"lightgbm-fine": ("model-fine.txt", _lightgbm_fine)}


class Case:
    def __init__(self, kind, source, artifact, reference):
        self.kind = kind
        self.source = source
        self.artifact = artifact
        self.model = load_artifact(artifact)
        self.reference = reference  # (X, margin) -> the library's own prediction


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("registry")


_cases: dict[str, Case] = {}


@pytest.fixture(scope="session", params=list(MAKERS))
def case(request, model_dir, registry) -> Case:
    return get_case(request.param, model_dir, registry)


def get_case(kind, model_dir, registry) -> Case:
    if kind not in _cases:
        filename, maker = {**MAKERS, **EXTRA_MAKERS}[kind]
        source = model_dir / filename
        reference = maker(source)
        artifact = build_artifact(source, registry / "models", name=kind, beta=0.25)
        _cases[kind] = Case(kind, source, artifact, reference)
    return _cases[kind]


@pytest.fixture(scope="session")
def lgb_case(model_dir, registry) -> Case:
    return get_case("lightgbm", model_dir, registry)
