"""What the suite's tests share beyond muse.server.testing: the registries they build
(the session's compiled models, references fraud and risk), seeded rows, per-tenant
calibrations, and the score log read back."""

from __future__ import annotations

import pathlib

import numpy as np
import polars as pl
from conftest import get_case, training_data

from muse.calib import AlertRateCurve, ReferenceFile
from muse.core.registry import Registry
from muse.server.scorelog import SCHEMA
from muse.server.testing import build_registry, fit_calibration

CURVE = AlertRateCurve([0.2, 0.5, 0.6, 0.8], [0.70, 0.35, 0.10, 0.05])


def rows(n: int, seed: int) -> np.ndarray:
    """``n`` rows of the training distribution (with missing values), seeded."""
    X, _ = training_data(rows=n, seed=seed)
    return X


def make_registry(root: pathlib.Path, cases: dict) -> Registry:
    """models/NAME -> the compiled versions of ``cases`` (NAME -> conftest.Case); references fraud and risk."""
    return build_registry(
        root,
        models={name: case.artifact.parent for name, case in cases.items()},
        references=[ReferenceFile(intent, CURVE) for intent in ("fraud", "risk")],
    )


def calibrated_registry(root: pathlib.Path, model_dir: pathlib.Path) -> Registry:
    """ROOT/registry with lightgbm (also as lightgbm-copy) calibrated per tenant acme, and
    xgboost-json calibrated as xgb-cal: the models of the deployment and scoring tests."""
    cases = {k: get_case(k, model_dir, root / "compiled") for k in ("lightgbm", "xgboost-json")}
    cases["lightgbm-copy"] = cases["lightgbm"]
    reg = make_registry(root / "registry", cases)
    calibrate(reg, "lightgbm", {"acme": 1})
    calibrate(reg, "xgboost-json", {}, name="xgb-cal")
    return reg


def calibrate(reg: Registry, model: str, tenants: dict[str, int], name: str | None = None) -> None:
    """Calibration NAME/1 (NAME defaults to the model's) onto reference fraud: an all-traffic map
    plus one per tenant, each fitted on its own seeded sample."""
    for tenant, seed in [(None, 0), *tenants.items()]:
        fit_calibration(reg, model, rows(2000, seed=100 + seed), reference="fraud", name=name or model, tenant=tenant)


def read_log(directory: pathlib.Path) -> pl.DataFrame:
    """Every row of the score log in ``directory`` (files are renamed into place whole, so any
    file listed is complete); an empty frame before the first file."""
    files = sorted(pathlib.Path(directory).glob("scores-*.parquet"))
    if not files:
        return pl.DataFrame(schema=SCHEMA)
    return pl.concat([pl.read_parquet(f) for f in files])
