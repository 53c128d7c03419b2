"""`muse demo`: the whole story on simulated data, from nothing, in a few minutes.

Each step runs the same `muse` command a user would type, and says so."""
from __future__ import annotations

import argparse
import pathlib
import shutil
import time

import numpy as np
import polars as pl

from muse.calib import AlertRateCurve, ReferenceFile, alert_rates
from muse.calib.reference import encode_reference
from muse.core import simulate
from muse.core.registry import Registry

REFERENCE = AlertRateCurve([0.2, 0.5, 0.6, 0.8], [0.70, 0.35, 0.10, 0.05])
BETA = 0.1  # negatives kept at training


def register(sub) -> None:
    p = sub.add_parser("demo", help="train, compile, calibrate and score on built-in simulated data")
    p.add_argument("--workdir", default="demo-out", type=pathlib.Path)
    p.add_argument("--rows", type=int, default=40_000, help="events per tenant per month")
    p.set_defaults(func=cmd_demo)


def step(title: str) -> None:
    print(f"\n== {title}")


def run(argv: list[str]) -> None:
    from muse.server.cli import main

    print("$ muse " + " ".join(argv))
    if main(argv) != 0:
        raise SystemExit(f"demo step failed: muse {' '.join(argv)}")


def train_model(months, rows: int, path: pathlib.Path, seed: int) -> None:
    import lightgbm as lgb

    parts = [simulate.generate_mix(m, rows, seed=seed) for m in months]
    X = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    Xs, ys = simulate.undersample(X, y, BETA, seed=seed)
    params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.05, "min_data_in_leaf": 40,
              "feature_fraction": 0.9, "verbose": -1, "seed": seed, "num_threads": 2}
    ds = lgb.Dataset(Xs, ys, feature_name=simulate.FEATURES, categorical_feature=["merchant_category"])
    lgb.train(params, ds, num_boost_round=200).save_model(str(path))
    print(f"trained on months {months[0]}-{months[-1]}: {y.size} events, {int(y.sum())} frauds; "
          f"kept {ys.size} after keeping negatives with beta={BETA}")


def cmd_demo(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    work: pathlib.Path = args.workdir
    if work.exists():
        shutil.rmtree(work)
    registry = work / "registry"
    reg = Registry(registry)
    reg.references_dir.mkdir(parents=True)
    rows = args.rows

    step("1. Train model v1 on months 0-2 with negatives undersampled")
    train_model([0, 1, 2], rows, work / "fraud_v1.txt", seed=1)

    step("2. Compile it into a native artifact")
    run(["compile", str(work / "fraud_v1.txt"), "--registry", str(registry), "--name", "fraud", "--beta", str(BETA)])

    step("3. Declare the intent's reference distribution (alert rate at or above each edge)")
    reg.reference_path("fraud").write_bytes(encode_reference(ReferenceFile("fraud", REFERENCE, "card fraud")))
    print(reg.reference_path("fraud").read_text())

    step("4. Calibrate v1 on month 3 traffic, per tenant")
    X, _, tenants = simulate.generate_mix(3, rows, seed=7)
    model = reg.load_model("fraud")
    frame = pl.DataFrame({"tenant": tenants, "margin": model.predict(X, margin=True)})
    frame.write_parquet(work / "month3_scores.parquet")
    run(["calib", "fit", "--registry", str(registry), "--model", "fraud", "--reference", "fraud",
         "--scores", str(work / "month3_scores.parquet"), "--by", "tenant"])

    step("5. Score fresh month 4 traffic: raw -> corrected -> mapped")
    from muse.calib import MapTable

    cal_tenants = reg.calibration_tenants("fraud")
    maps = [reg.load_calibration("fraud", tenant=t).quantile_map() for t in cal_tenants]
    table = MapTable(maps)
    X4, y4, t4 = simulate.generate_mix(4, rows, seed=11)
    raw = model.predict(X4, margin=True)
    index = np.array([cal_tenants.index(t) for t in t4])
    corrected, mapped = table.calibrate(raw, index, model.manifest.beta, model.manifest.margin_kind)
    print(f"{'tenant':<12} {'model prob':>10} {'corrected':>10} {'mapped':>8}  label")
    for i in np.random.default_rng(0).choice(raw.size, 6, replace=False):
        print(f"{t4[i]:<12} {1 / (1 + np.exp(-raw[i])):>10.4f} {corrected[i]:>10.4f} {mapped[i]:>8.4f}  {y4[i]}")

    step("6. Alert rate at each reference edge on month 4, per tenant (target in brackets)")
    print(f"{'tenant':<12} " + " ".join(f"{'>= ' + format(e, 'g'):>14}" for e in REFERENCE.edges))
    for t in cal_tenants:
        rates = alert_rates(mapped[t4 == t], REFERENCE.edges)
        print(f"{t:<12} " + " ".join(f"{r:>7.3f} [{target:.2f}]" for r, target in zip(rates, REFERENCE.rates)))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; registry in {registry}")
