"""Benchmark models, trained on synthetic data so every run is reproducible offline."""

from __future__ import annotations

import pathlib

import numpy as np


def fraud_like_matrix(rows: int, features: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features))
    X[:, : features // 4] = np.round(X[:, : features // 4] * 3)  # integer-ish columns: ties on thresholds
    X[rng.random(X.shape) < 0.05] = np.nan
    logit = np.nansum(X[:, :8], axis=1) * 0.6 + np.nan_to_num(X[:, 8] * X[:, 9]) - 4.5
    y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int32)
    return X, y


def train_lightgbm(path: pathlib.Path, trees: int, leaves: int, features: int = 100, rows: int = 20000) -> pathlib.Path:
    import lightgbm as lgb

    if path.exists():
        return path
    X, y = fraud_like_matrix(rows, features)
    params = {
        "objective": "binary",
        "num_leaves": leaves,
        "learning_rate": 0.05,
        "min_data_in_leaf": 5,
        "verbose": -1,
        "num_threads": 2,
        "seed": 0,
    }
    booster = lgb.train(params, lgb.Dataset(X, y), num_boost_round=trees)
    path.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(path))
    return path
