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


# -- names from arguments and from the score log never leave the registry (issue 14) ---------------


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--name", "../../x"], "--name (the calibration name) '../../x' is not a valid name"),
        (["--version", "../x"], "--version (the calibration version) '../x' is not a valid name"),
        (["--version", "1\n"], "is not a valid name"),
        (["--model", "../../lightgbm"], "model '../../lightgbm' is not NAME or NAME/VERSION"),
        (["--reference", "../../fraud"], "or give the path of a .toml/.json reference file"),
    ],
)
def test_fit_refuses_names_that_would_be_paths(reg, tmp_path, capsys, extra, words):
    pl.DataFrame({"margin": np.linspace(-3, 3, 2000)}).write_parquet(tmp_path / "log.parquet")
    before = files_under(tmp_path)
    args = ["--registry", str(reg.root), "--model", "lightgbm", "--reference", "fraud"]
    args += ["--scores", str(tmp_path / "log.parquet"), *extra]
    assert cli(["calib", "fit", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and "letters, digits" in err
    assert files_under(tmp_path) == before


def test_fit_by_tenant_keeps_hostile_score_log_values_inside_the_registry(reg, tmp_path, capsys):
    """The score log holds tenants as clients sent them: a null, empty, path-like or
    right-to-left-override value gets no file of its own; a valid one gets exactly one."""
    tenants = ["../../../../srv-evil", None, "", "\u202eacme", "ok", "Acme Corp"]
    column = [t for t in tenants for _ in range(1200)]
    margins = np.random.default_rng(3).logistic(-3, 1.5, len(column))
    pl.DataFrame({"tenant": column, "margin": margins}).write_parquet(tmp_path / "log.parquet")
    before = files_under(tmp_path)
    args = ["--registry", str(reg.root), "--model", "lightgbm", "--reference", "fraud"]
    assert cli(["calib", "fit", *args, "--scores", str(tmp_path / "log.parquet"), "--by", "tenant"]) == 0
    err = capsys.readouterr().err
    assert "1200 rows have no tenant" in err
    assert "3 values are not tenant names" in err and "'../../../../srv-evil'" in err and "'\\u202eacme'" in err
    assert reg.calibration_tenants("lightgbm") == ["Acme Corp", "ok"]
    assert reg.load_calibration("lightgbm", tenant="Acme Corp").sample_size == 1200
    assert reg.load_calibration("lightgbm").sample_size == len(column)  # every row counts toward it
    written = sorted(set(files_under(tmp_path)) - set(before))
    assert written == [
        "reg/calibrations/lightgbm/1/calibration.json",
        "reg/calibrations/lightgbm/1/tenants/Acme%20Corp.json",
        "reg/calibrations/lightgbm/1/tenants/ok.json",
    ]
