"""`muse calib fit` and `muse calib report`."""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
from typing import cast

import numpy as np
import polars as pl

from muse.calib import (
    ModelIdentity,
    alert_rates,
    correct_margins,
    correct_probabilities,
    fit_per_group,
    fit_quantile_map,
    make_calibration,
)
from muse.calib.names import check_name, is_tenant, tenant_problem
from muse.calib.samples import read_frame, read_table
from muse.core.registry import Registry


def register(sub) -> None:
    calib = sub.add_parser("calib", help="fit and inspect calibrations (quantile maps)")
    csub = calib.add_subparsers(dest="calib_command", required=True)

    fit = csub.add_parser("fit", help="fit a model's quantile map onto a reference")
    fit.add_argument("--registry", required=True)
    fit.add_argument("--model", required=True, help="NAME or NAME/VERSION of a compiled model")
    fit.add_argument("--reference", required=True, help="reference name in the registry, or a .toml/.json file")
    src = fit.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", help="Parquet/CSV file (or directory of Parquet) with corrected scores or raw margins")
    src.add_argument("--features", help="Parquet/CSV file of feature rows to score with the model")
    fit.add_argument("--column", default=None, help="score column (default: 'corrected', else 'margin')")
    fit.add_argument("--predictor", help="only rows of this predictor (a score log holds every predictor's scores)")
    fit.add_argument(
        "--by",
        default=None,
        help="also fit one map per tenant, named by this column (e.g. tenant); rows without a valid "
        "tenant name count only toward the all-traffic map",
    )
    fit.add_argument("--min-samples", type=int, default=1000)
    fit.add_argument("--name", help="calibration name (default: the model name); a name: letters, digits, _ . -")
    fit.add_argument("--version", help="calibration version (default: next number); a name like --name")
    fit.set_defaults(func=cmd_fit)

    st = csub.add_parser(
        "status", help="which live calibrations have drifted: alert rates from the score log vs target"
    )
    st.add_argument("--registry", required=True)
    st.add_argument("--scores", help="score log directory (default: REGISTRY/scorelog)")
    st.add_argument(
        "--tolerance",
        type=float,
        default=0.25,
        help="drifted when |achieved - target| > tolerance * target at any edge (default 0.25)",
    )
    st.add_argument("--min-samples", type=int, default=500, help="series with fewer scores are not judged")
    st.add_argument("--since-minutes", type=float, help="only records this recent")
    st.add_argument(
        "--all-generations",
        action="store_true",
        help="judge every logged generation (default: only the latest, i.e. what is live)",
    )
    st.set_defaults(func=cmd_status)

    rep = csub.add_parser("report", help="write a PNG: distributions before/after, target vs achieved alert rates")
    rep.add_argument("--registry", required=True)
    rep.add_argument("--calibration", required=True, help="NAME or NAME/VERSION")
    rep.add_argument("--scores", required=True, help="scores to evaluate on (same columns as for fit)")
    rep.add_argument("--column", default=None)
    rep.add_argument("--compare", help="a second calibration NAME[/VERSION] to put side by side")
    rep.add_argument("--compare-scores", help="scores for the second calibration's model")
    rep.add_argument("--out", default="calibration-report.png")
    rep.set_defaults(func=cmd_report)


def corrected_scores(frame: pl.DataFrame, column: str | None, beta: float, margin_kind: str) -> np.ndarray:
    """Corrected probabilities from a score frame: a 'corrected' column as is, or margins corrected here."""
    if column is None:
        column = "corrected" if "corrected" in frame.columns else "margin" if "margin" in frame.columns else None
        if column is None:
            raise ValueError(
                f"score file has neither a 'corrected' nor a 'margin' column (has: {', '.join(frame.columns)}); "
                "pass --column"
            )
    values = read_frame(frame, column)[column].cast(pl.Float64).to_numpy()
    if column != "margin":
        return values
    return correct_margins(values, beta) if margin_kind == "logit" else correct_probabilities(values, beta)


def only_predictor(frame: pl.DataFrame, predictor: str, source: str) -> pl.DataFrame:
    if "predictor" not in frame.columns:
        raise ValueError(f"{source}: no 'predictor' column to select {predictor!r} by; is it a score log?")
    rows = frame.filter(pl.col("predictor") == predictor)
    if rows.height == 0:
        present = sorted(frame["predictor"].unique().to_list())
        raise ValueError(
            f"{source}: no scores of predictor {predictor!r} (present: {', '.join(present) or 'none'}); "
            "is it deployed as a shadow, and has the server flushed its log?"
        )
    return rows


def feature_matrix(frame: pl.DataFrame, feature_names: list[str], source: str) -> np.ndarray:
    missing = [f for f in feature_names if f not in frame.columns]
    if missing:
        raise ValueError(
            f"{source}: missing feature columns {', '.join(missing[:5])}; the model expects {', '.join(feature_names)}"
        )
    return frame.select(feature_names).cast(pl.Float64).to_numpy()


def warn(message: str) -> None:
    print(f"muse calib: warning: {message}", file=sys.stderr)


def tenant_rows(frame: pl.DataFrame, by: str, scores: np.ndarray) -> pl.DataFrame:
    """(by, score) rows whose ``by`` value is a tenant name (muse.calib.names), as strings.  A
    score log holds what clients sent: rows without a value or with a value that is no tenant
    name are left out (they still count toward the all-traffic map), with a warning."""
    data = pl.DataFrame({by: frame[by].cast(pl.String), "score": scores})
    nulls = data[by].null_count()
    if nulls:
        warn(f"--by {by}: {nulls} rows have no {by}; they count only toward the all-traffic map")
    data = data.filter(pl.col(by).is_not_null())
    invalid = [v for v in data[by].unique().sort().to_list() if not is_tenant(v)]
    if invalid:
        rows = data.filter(pl.col(by).is_in(invalid)).height
        shown = "; ".join(f"{v!r}: {tenant_problem(v)}" for v in invalid[:5])
        more = f" and {len(invalid) - 5} more" if len(invalid) > 5 else ""
        warn(
            f"--by {by}: {len(invalid)} values are not tenant names ({shown}{more}); "
            f"their {rows} rows count only toward the all-traffic map"
        )
        data = data.filter(~pl.col(by).is_in(invalid))
    return data


def cmd_fit(args: argparse.Namespace) -> None:
    # Both become directory names in the registry: checked before any work.
    if args.name is not None:
        check_name("--name (the calibration name)", args.name)
    if args.version is not None:
        check_name("--version (the calibration version)", args.version)
    reg = Registry(args.registry)
    model = reg.load_model(args.model)
    m = model.manifest
    ref = reg.load_reference(args.reference)
    if args.scores:
        frame = read_table(args.scores)
        if args.predictor:
            frame = only_predictor(frame, args.predictor, args.scores)
        scores = corrected_scores(frame, args.column, m.beta, m.margin_kind)
    else:
        frame = read_table(args.features)
        X = feature_matrix(frame, m.feature_names, args.features)
        raw = model.predict(X, margin=True)
        scores = correct_margins(raw, m.beta) if m.margin_kind == "logit" else correct_probabilities(raw, m.beta)
    name = args.name or m.name
    version = args.version or reg.next_calibration_version(name)
    identity = ModelIdentity(m.name, m.version, m.library_sha256)
    window = _window(frame)
    calibration = functools.partial(  # what every map of this fit shares
        make_calibration,
        name=name,
        version=version,
        model=identity,
        reference_name=ref.name,
        reference=ref.reference,
        beta=m.beta,
        window=window,
    )
    qmap = fit_quantile_map(scores, ref.reference, args.min_samples)
    path = reg.save_calibration(calibration(qmap, sample_size=scores.size))
    print(
        f"fitted {name}/{version} for model {m.name}/{m.version} onto reference {ref.name}: "
        f"{len(qmap)} knots from {scores.size} scores -> {path}"
    )
    _print_rates(ref.reference.edge_rates(), alert_rates(qmap(scores), [e for e, _ in ref.reference.edge_rates()]))
    if args.by:
        if args.by not in frame.columns:
            raise ValueError(f"--by {args.by}: the score file has no such column")
        groups = fit_per_group(
            tenant_rows(frame, args.by, scores),
            ref.reference,
            by=args.by,
            min_samples=args.min_samples,
        )
        for tenant, tmap in groups.maps.items():
            reg.save_calibration(calibration(tmap, sample_size=groups.sizes[tenant], tenant=tenant))
            print(f"  {args.by} {tenant}: {groups.sizes[tenant]} scores, {len(tmap)} knots")
        for tenant, why in groups.skipped.items():
            print(f"  {args.by} {tenant}: skipped, uses the all-traffic map ({why})")


def _window(frame: pl.DataFrame) -> tuple[str | None, str | None]:
    if "time" not in frame.columns:
        return None, None
    col = frame["time"]
    return str(col.min()), str(col.max())


def _print_rates(edge_rates, achieved) -> None:
    print("  edge     target   achieved")
    for (edge, target), got in zip(edge_rates, achieved):
        print(f"  {edge:<8.4g} {target:<8.4f} {got:.4f}")


def cmd_report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reg = Registry(args.registry)
    runs = [(args.calibration, args.scores)]
    if args.compare:
        runs.append((args.compare, args.compare_scores or args.scores))
    panels = []
    for ref_name, score_file in runs:
        cal = reg.load_calibration(ref_name)
        model = reg.load_model(f"{cal.model.name}/{cal.model.version}")
        scores = corrected_scores(read_table(score_file), args.column, cal.beta, model.manifest.margin_kind)
        mapped = cal.quantile_map()(scores)
        panels.append((f"{cal.name}/{cal.version} ({cal.model.name}/{cal.model.version})", cal, scores, mapped))
    edges = np.array([e for e, _ in panels[0][1].reference.edge_rates()])
    targets = np.array([r for _, r in panels[0][1].reference.edge_rates()])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    bins = np.linspace(0, 1, 51)
    for label, _, scores, mapped in panels:
        axes[0].hist(scores, bins=bins, histtype="step", log=True, label=f"before: {label}")
        axes[0].hist(mapped, bins=bins, histtype="stepfilled", alpha=0.35, log=True, label=f"after: {label}")
    axes[0].set(title="Score distribution before / after mapping", xlabel="score", ylabel="events (log)")
    axes[0].legend(fontsize=7)
    grid = np.linspace(0.001, 0.999, 400)
    ref_p, ref_v = panels[0][1].reference.knots()
    target_curve = 1.0 - np.interp(grid, ref_v, ref_p)  # fraction at or above t is 1 - F_ref(t)
    axes[1].plot(grid, target_curve, "k--", label="target (reference)")
    for label, _, _, mapped in panels:
        axes[1].plot(grid, alert_rates(mapped, grid), label=f"achieved: {label}")
    axes[1].scatter(edges, targets, color="k", zorder=3)
    axes[1].set(
        title="Alert rate at or above each score", xlabel="threshold", ylabel="fraction of events", yscale="log"
    )
    axes[1].legend(fontsize=7)
    width = 0.8 / (len(panels) + 1)
    x = np.arange(edges.size)
    axes[2].bar(x - 0.4 + width / 2, targets, width, color="k", alpha=0.3, label="target")
    for i, (label, _, _, mapped) in enumerate(panels, start=1):
        axes[2].bar(x - 0.4 + width / 2 + i * width, alert_rates(mapped, edges), width, label=label)
    axes[2].set_xticks(x, [f"{e:g}" for e in edges])
    axes[2].set(title="Alert rate at each reference edge", xlabel="edge", ylabel="fraction of events")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    header = "  edge     target   " + "  ".join(f"{p[0][:28]:>28}" for p in panels)
    print(header)
    for edge, target in zip(edges, targets):
        print(f"  {edge:<8.4g} {target:<8.4f} " + "  ".join(f"{alert_rates(p[3], [edge])[0]:>28.4f}" for p in panels))


def cmd_status(args: argparse.Namespace) -> int:
    """Exit status 1 when any judged series has drifted, so schedulers can alert on it."""
    reg = Registry(args.registry)
    source = args.scores or str(reg.root / "scorelog")
    frame = read_table(source)
    if args.since_minutes is not None and "time" in frame.columns:
        # a Datetime column (the score log's schema); polars types Series.max() as any Python scalar
        latest = cast(datetime.datetime, frame["time"].max())
        cutoff = latest - datetime.timedelta(minutes=args.since_minutes)
        frame = frame.filter(pl.col("time") >= cutoff)
    if not args.all_generations:
        frame = frame.filter(pl.col("generation") == frame["generation"].max())
        # an integer column (None when empty); polars types Series.max() as any Python scalar
        generation = cast("int | None", frame["generation"].max())
        print(f"generation {generation} (the latest in the log; --all-generations for history)")
    drifted = 0
    for intent in sorted(frame["intent"].drop_nulls().unique().to_list()):
        try:
            check_name("intent", intent)
        except ValueError as exc:
            warn(f"{source}: {exc}; its rows are not judged")
            continue
        edges = reg.load_reference(intent).reference.edge_rates()
        rates = (
            frame.filter(pl.col("intent") == intent)
            .group_by(["predictor", "role", "tenant"])
            .agg(
                pl.len().alias("n"), *[(pl.col("mapped") >= e).mean().alias(f"e{i}") for i, (e, _) in enumerate(edges)]
            )
            .sort(["predictor", "role", "tenant"])
        )
        print(f"intent {intent}: alert rate at each edge [target]; drifted beyond {args.tolerance:.0%} of target")
        print(
            f"  {'predictor':<14} {'role':<7} {'tenant':<14} {'scores':>8}  "
            + " ".join(f"{'>= ' + format(e, 'g'):>15}" for e, _ in edges)
            + "  status"
        )
        for row in rates.iter_rows(named=True):
            achieved = [row[f"e{i}"] for i in range(len(edges))]
            off = [abs(a - t) > args.tolerance * t for a, (_, t) in zip(achieved, edges)]
            status = "too few" if row["n"] < args.min_samples else "DRIFTED" if any(off) else "ok"
            drifted += status == "DRIFTED"
            tenant = row["tenant"] if is_tenant(row["tenant"]) else repr(row["tenant"])  # no control characters
            print(
                f"  {row['predictor']:<14} {row['role']:<7} {tenant:<14} {row['n']:>8}  "
                + " ".join(f"{a:>7.3f} [{t:.3f}]" for a, (_, t) in zip(achieved, edges))
                + f"  {status}"
            )
    print(f"{drifted} drifted series" if drifted else "no drift beyond tolerance")
    return 1 if drifted else 0
