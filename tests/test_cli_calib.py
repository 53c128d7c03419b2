"""`muse calib fit` / `muse calib report` end to end on a compiled model."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from conftest import training_data
from helpers import CURVE

from muse.calib import ReferenceFile, alert_rates, correct_margins, fit_quantile_map
from muse.server.cli import main as cli
from muse.server.testing import build_registry


@pytest.fixture
def reg(tmp_path, lgb_case):
    return build_registry(
        tmp_path / "reg", models={"lightgbm": lgb_case.artifact.parent}, references=[ReferenceFile("fraud", CURVE)]
    )


def test_fit_from_margins_per_tenant_then_report(reg, lgb_case, tmp_path, capsys):
    margins = np.random.default_rng(21).logistic(-3, 1.5, 6000)  # continuous: no ties to blur the rates
    tenants = np.where(np.arange(6000) % 3 == 0, "small", "big")
    tenants[:10] = "tiny"
    pl.DataFrame({"tenant": tenants, "margin": margins}).write_parquet(tmp_path / "log.parquet")
    args = [
        "calib",
        "fit",
        "--registry",
        str(reg.root),
        "--model",
        "lightgbm",
        "--reference",
        "fraud",
        "--scores",
        str(tmp_path / "log.parquet"),
        "--by",
        "tenant",
    ]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "tenant tiny: skipped" in out
    cal = reg.load_calibration("lightgbm")
    assert cal.model.version == lgb_case.model.manifest.version and cal.beta == 0.25 and cal.sample_size == 6000
    corrected = correct_margins(margins, 0.25)
    np.testing.assert_allclose(alert_rates(cal.quantile_map()(corrected), CURVE.edges), CURVE.rates, atol=2 / 6000)
    assert reg.calibration_tenants("lightgbm") == ["big", "small"]
    big = reg.load_calibration("lightgbm", tenant="big").quantile_map()
    rates = alert_rates(big(corrected[tenants == "big"]), CURVE.edges)
    np.testing.assert_allclose(rates, CURVE.rates, atol=2 / (tenants == "big").sum())

    png = tmp_path / "report.png"
    assert (
        cli(
            [
                "calib",
                "report",
                "--registry",
                str(reg.root),
                "--calibration",
                "lightgbm",
                "--scores",
                str(tmp_path / "log.parquet"),
                "--compare",
                "lightgbm/1",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_fit_from_features(reg, lgb_case, tmp_path):
    X, _ = training_data(rows=3000, seed=22)
    names = lgb_case.model.manifest.feature_names
    pl.DataFrame({n: X[:, i] for i, n in enumerate(names)}).write_csv(tmp_path / "features.csv")
    assert (
        cli(
            [
                "calib",
                "fit",
                "--registry",
                str(reg.root),
                "--model",
                "lightgbm/1",
                "--reference",
                "fraud",
                "--features",
                str(tmp_path / "features.csv"),
                "--version",
                "7",
            ]
        )
        == 0
    )
    cal = reg.load_calibration("lightgbm/7")
    assert cal.quantile_map() == fit_quantile_map(correct_margins(lgb_case.model.predict(X, margin=True), 0.25), CURVE)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--reference", "nope", "--scores", "{log}"], "reference 'nope' not found"),
        (["--reference", "fraud", "--scores", "{missing}"], "missing.parquet: no such file"),
        (["--reference", "fraud", "--scores", "{log}", "--column", "x"], "no column 'x'"),
        (["--reference", "fraud", "--scores", "{log}", "--min-samples", "100000"], "fewer than the minimum 100000"),
    ],
)
def test_fit_errors_are_one_line(reg, tmp_path, capsys, extra, words):
    pl.DataFrame({"margin": np.linspace(-3, 3, 2000)}).write_parquet(tmp_path / "log.parquet")
    extra = [e.format(log=tmp_path / "log.parquet", missing=tmp_path / "missing.parquet") for e in extra]
    assert cli(["calib", "fit", "--registry", str(reg.root), "--model", "lightgbm", *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
