"""`muse calib fit` and `muse calib report`."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import sys
from typing import cast

import numpy as np
import polars as pl

from muse.calib import (
    Calibration,
    SampleError,
    alert_rates,
    correct_margins,
    correct_probabilities,
    fit_per_group,
    fit_quantile_map,
    make_calibration,
)
from muse.calib.names import check_name, is_tenant, tenant_problem
from muse.calib.quantile_map import DEFAULT_MIN_SAMPLES, MAX_EDGE_ERROR, EdgeMiss, edge_misses
from muse.calib.samples import read_frame, read_table
from muse.core.deploy import DeploymentStore
from muse.core.file_scoring import predictor_scorer
from muse.core.fit_target import FitTarget, deployed_predictor, model_target, predictor_target
from muse.core.labels import LabelStore, label_metrics, labelled_events, shared_ids
from muse.core.registry import Registry, RegistryError
from muse.core.spec import PredictorSpec, SpecError

from .cli_args import add_registry, add_score_log
from .cli_refresh import register_refresh

# `muse calib status` calls a series drifted when an edge's alert rate is off its target by more
# than this fraction of the target; `muse calib fit` warns when ties leave a fresh map that far off.
STATUS_TOLERANCE = 0.25


def register(sub) -> None:
    calib = sub.add_parser("calib", help="fit and inspect calibrations (quantile maps)")
    csub = calib.add_subparsers(dest="calib_command", required=True)

    fit = csub.add_parser(
        "fit",
        help="fit a model's (or a deployed predictor's) quantile map onto a reference",
        description="Fit a quantile map onto a reference and write it as a new calibration version (all of "
        "it or nothing). A sample whose ties (point masses) leave a reference edge's alert rate off its "
        f"target by more than {MAX_EDGE_ERROR:.0%} of the target (plus one score's worth, 1/n) is refused; "
        f"beyond {STATUS_TOLERANCE:.0%} (what `muse calib status` calls drift) the fit warns.",
    )
    add_registry(fit)
    fit.add_argument(
        "--model",
        help="NAME or NAME/VERSION of a compiled model (default: the model(s) that --predictor runs in the "
        "registry's current deployment; several = an ensemble, fitted from its score-log rows)",
    )
    fit.add_argument(
        "--reference",
        help="reference name in the registry, or a .toml/.json file (default: the intent of --predictor in the "
        "current deployment)",
    )
    src = fit.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", help="Parquet/CSV file (or directory of Parquet) with corrected scores or raw margins")
    src.add_argument(
        "--features",
        help="Parquet/CSV file of feature rows to score with the model (an ensemble predictor: with its "
        "members, combined as it serves them)",
    )
    fit.add_argument(
        "--column",
        default=None,
        help="score column (default: 'corrected', else 'margin'). A 'corrected' column is used as is (the "
        "server already applied the posterior correction); a 'margin' column (and the model's output on "
        "--features) is corrected here with the model manifest's beta, the negative keep-rate given to "
        "`muse compile --beta` (default 1: no undersampling, no correction). An ensemble's rows hold its "
        "combined, already corrected scores.",
    )
    fit.add_argument(
        "--predictor",
        help="NAME or NAME/VERSION: only this predictor's rows, active and shadow alike (a score log holds "
        "every predictor's scores: required when the scores hold several). Without VERSION: the version "
        "the current deployment runs, else the only one in the scores",
    )
    fit.add_argument(
        "--by",
        default=None,
        help="also fit one map per tenant, named by this column (e.g. tenant); rows without a valid "
        "tenant name count only toward the all-traffic map",
    )
    fit.add_argument(
        "--min-samples",
        type=int,
        default=DEFAULT_MIN_SAMPLES,
        help=f"fewest scores to fit a map from, the all-traffic map and each tenant's (default "
        f"{DEFAULT_MIN_SAMPLES}; at least 1); tenants with fewer use the all-traffic map",
    )
    fit.add_argument(
        "--name",
        help="calibration name (default: the model name; an ensemble's: the predictor name); a name: "
        "letters, digits, _ . -",
    )
    fit.add_argument("--version", help="calibration version (default: next number); a name like --name")
    fit.set_defaults(func=cmd_fit)

    st = csub.add_parser(
        "status", help="which live calibrations have drifted: alert rates from the score log vs target"
    )
    add_registry(st)
    add_score_log(st)
    st.add_argument(
        "--tolerance",
        type=float,
        default=STATUS_TOLERANCE,
        help=f"drifted when |achieved - target| > tolerance * target at any edge (default {STATUS_TOLERANCE})",
    )
    st.add_argument("--min-samples", type=int, default=500, help="series with fewer scores are not judged")
    st.add_argument("--since-minutes", type=float, help="only records this recent")
    st.add_argument(
        "--all-generations",
        action="store_true",
        help="judge every logged generation (default: only the latest, i.e. what is live)",
    )
    st.add_argument(
        "--labels",
        action="store_true",
        help="also, per series and edge, the alert rate, recall and precision among the events labelled with "
        "`muse labels import` (joined by event id; an event scored twice by a predictor counts once, its last "
        "score), and how many events are labelled and unlabelled",
    )
    st.set_defaults(func=cmd_status)

    rep = csub.add_parser("report", help="write a PNG: distributions before/after, target vs achieved alert rates")
    add_registry(rep)
    rep.add_argument("--calibration", required=True, help="NAME or NAME/VERSION")
    rep.add_argument("--scores", required=True, help="scores to evaluate on (same columns as for fit)")
    rep.add_argument("--column", default=None)
    rep.add_argument(
        "--predictor",
        help="NAME or NAME/VERSION: evaluate on this predictor's rows of --scores (required when they hold "
        "several predictors, as a score log does)",
    )
    rep.add_argument("--compare", help="a second calibration NAME[/VERSION] to put side by side")
    rep.add_argument("--compare-scores", help="scores for the second calibration's model (default: --scores)")
    rep.add_argument(
        "--compare-predictor",
        help="NAME or NAME/VERSION: the second calibration's predictor's rows of its scores (required when "
        "they hold several predictors)",
    )
    rep.add_argument("--out", default="calibration-report.png")
    rep.set_defaults(func=cmd_report)
    register_refresh(csub)


def score_column(frame: pl.DataFrame, column: str | None, source: str = "score file") -> str:
    """--column, else 'corrected', else 'margin'."""
    if column is not None:
        return column
    for name in ("corrected", "margin"):
        if name in frame.columns:
            return name
    raise ValueError(
        f"{source} has neither a 'corrected' nor a 'margin' column (has: {', '.join(frame.columns)}); pass --column"
    )


def corrected_scores(
    frame: pl.DataFrame, column: str | None, beta: float, margin_kind: str, source: str = "score file"
) -> np.ndarray:
    """Corrected probabilities from a score frame: a 'corrected' column as is, or margins corrected here."""
    column = score_column(frame, column, source)
    values = read_frame(frame, column)[column].cast(pl.Float64).to_numpy()
    if column != "margin":
        return values
    return correct_margins(values, beta) if margin_kind == "logit" else correct_probabilities(values, beta)


def _shown(value: object) -> str:
    """A value from a score file, printable on one line (a name as is, anything else quoted)."""
    if value is None:
        return "(none)"
    try:
        return check_name("predictor", value)
    except ValueError:
        return repr(value)


def _counts(frame: pl.DataFrame, column: str, limit: int = 12) -> tuple[int, str]:
    """How many values ``column`` takes and 'value: N rows, ...' (the most rows first)."""
    counts = (
        frame.group_by(pl.col(column).cast(pl.String)).len().sort(["len", column], descending=[True, False])
    ).rows()
    shown = ", ".join(f"{_shown(v)}: {n:,} rows" for v, n in counts[:limit])
    more = f" and {len(counts) - limit} more" if len(counts) > limit else ""
    return len(counts), shown + more


def split_predictor(flag: str, value: str) -> tuple[str, str | None]:
    """--predictor NAME or NAME/VERSION, each part a name."""
    name, _, version = value.partition("/")
    try:
        check_name("predictor name", name)
        if version:
            check_name("predictor version", version)
    except ValueError as exc:
        raise ValueError(f"{flag} {value!r} is not NAME or NAME/VERSION: {exc}") from None
    return name, version or None


def select_predictor(
    frame: pl.DataFrame, wanted: str | None, source: str, flag: str, version: str | None = None
) -> pl.DataFrame:
    """The rows of one predictor (and one version of it) in a score file.

    A file with a 'predictor' column that holds several predictors needs ``wanted`` (the
    ``flag`` named in the error): pooling them would fit one map to many models' scores.
    Active and shadow rows of one predictor are pooled: both are its scores of live traffic.
    A predictor name whose rows carry several versions needs NAME/VERSION, or ``version``
    (the one deployed), for the same reason."""
    if "predictor" not in frame.columns:
        if wanted is not None:
            raise ValueError(f"{source}: no 'predictor' column to select {wanted!r} by ({flag}); is it a score log?")
        return frame
    count, listing = _counts(frame, "predictor")
    if wanted is None:
        if count > 1:
            raise ValueError(
                f"{source}: holds the scores of {count} predictors ({listing}); "
                f"pass {flag} NAME to use one predictor's scores"
            )
        if count == 0:
            return frame
        rows, name, asked = frame, _shown(frame["predictor"][0]), None  # the only one: its versions still count
    else:
        name, asked = split_predictor(flag, wanted)
        version = asked or version
        rows = frame.filter(pl.col("predictor").cast(pl.String) == name)
        if rows.height == 0:
            raise ValueError(
                f"{source}: no scores of predictor {name!r} (present: {listing or 'none'}); "
                "is it deployed (active or shadow), and has the server flushed its log?"
            )
    if "version" not in rows.columns:
        if asked is not None:
            raise ValueError(f"{source}: no 'version' column to select {flag} {wanted} by; pass {flag} {name}")
        return rows
    versions, vlisting = _counts(rows, "version")
    if version is not None:
        chosen = rows.filter(pl.col("version").cast(pl.String) == version)
        if chosen.height == 0:
            raise ValueError(
                f"{source}: no scores of predictor {name!r} version {version!r} (its versions: {vlisting}); "
                f"pass {flag} {name}/VERSION"
            )
        return chosen
    if versions > 1:
        raise ValueError(
            f"{source}: predictor {name!r} has scores of {versions} versions ({vlisting}); "
            f"pass {flag} {name}/VERSION to use one version's scores"
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


def fit_target(reg: Registry, args: argparse.Namespace) -> tuple[FitTarget, PredictorSpec | None, str | None]:
    """(what to fit for, the deployed predictor named by --predictor or None, the predictor version
    whose rows to use or None)."""
    name, version = split_predictor("--predictor", args.predictor) if args.predictor else (None, None)
    if args.model is None:
        if name is None:
            raise ValueError("--model: required unless --predictor names a predictor of the current deployment")
        found = deployed_predictor(reg, name)
        if found is None:
            generation = DeploymentStore(reg).current_generation()
            where = f"generation {generation}" if generation is not None else "nothing is deployed"
            raise ValueError(
                f"--predictor {name}: not in the registry's current deployment ({where}); "
                "pass --model NAME/VERSION of the model whose scores these are"
            )
        generation, p = found
        if version is not None and version != p.version:
            raise ValueError(
                f"--predictor {args.predictor}: the current deployment (generation {generation}) runs {name} "
                f"version {p.version}; pass --predictor {name} or --model for another version"
            )
        return predictor_target(reg, p), p, p.version
    target = model_target(reg.load_model(args.model))
    found = None
    if name is not None:
        with contextlib.suppress(SpecError, OSError):  # a broken deployment: --model says what to fit for
            found = deployed_predictor(reg, name)
    if found is None:
        return target, None, version
    generation, p = found
    if version is not None and version != p.version:  # another version than deployed: --model decides
        return target, None, version
    runs = [model_target(reg.load_model(ref)).identity for ref in p.models]
    if runs != [target.identity]:
        raise ValueError(
            f"--model {args.model}: predictor {name} in the current deployment (generation {generation}) runs "
            f"{' + '.join(p.models)}, so its rows are not this model's scores; drop --model to fit for {name} "
            "as deployed"
        )
    return target, p, p.version


def _tie_warnings(misses: list[EdgeMiss], where: str) -> None:
    for miss in misses:
        warn(
            f"{where}: at edge {miss.edge:g} the map alerts on {miss.achieved:.4f} for a target of {miss.target:g} "
            f"({miss.error:.0%} off; `muse calib status` calls beyond {STATUS_TOLERANCE:.0%} drift): {miss.reason()}"
        )


def cmd_fit(args: argparse.Namespace) -> None:
    # Everything is checked and fitted before anything is written; the version is then
    # published whole (Registry.publish_calibration), so a failed fit leaves no version behind.
    # Both become directory names in the registry: checked before any work.
    if args.name is not None:
        check_name("--name (the calibration name)", args.name)
    if args.version is not None:
        check_name("--version (the calibration version)", args.version)
    if args.min_samples < 1:
        raise ValueError(
            f"--min-samples {args.min_samples}: a map is fitted from at least 1 score; "
            f"give a whole number >= 1 (default {DEFAULT_MIN_SAMPLES})"
        )
    reg = Registry(args.registry)
    target, deployed, predictor_version = fit_target(reg, args)
    if args.reference is None:
        if deployed is None:
            raise ValueError(
                "--reference: required unless --predictor names a predictor of the current deployment "
                "(whose intent's reference is used)"
            )
        ref = reg.load_reference(deployed.intent)
    else:
        ref = reg.load_reference(args.reference)
        if deployed is not None and ref.name != deployed.intent:
            warn(
                f"--reference {args.reference}: predictor {deployed.name} serves intent {deployed.intent!r}; "
                f"a deployment refuses its calibration unless it maps onto reference {deployed.intent!r}"
            )
    source = args.scores or args.features
    if args.scores:
        frame = select_predictor(read_table(args.scores), args.predictor, args.scores, "--predictor", predictor_version)
    else:
        frame = read_table(args.features)
    if args.by and args.by not in frame.columns:
        raise ValueError(f"--by {args.by}: {source} has no such column (has: {', '.join(frame.columns)})")
    if args.scores:
        scores = corrected_scores(frame, args.column, target.beta, target.margin_kind, args.scores)
    elif target.model is None:  # an ensemble: its members' scores combined, as it serves them
        assert deployed is not None
        scorer = predictor_scorer(reg, deployed.name)
        scores = scorer.score(feature_matrix(frame, list(scorer.feature_names), args.features)).corrected
    else:
        m = target.model.manifest
        raw = target.model.predict(feature_matrix(frame, m.feature_names, args.features), margin=True)
        scores = correct_margins(raw, m.beta) if m.margin_kind == "logit" else correct_probabilities(raw, m.beta)
    name = args.name or target.default_name
    version = args.version or reg.next_calibration_version(name)
    if (reg.calibrations_dir / name / version).exists():
        raise FileExistsError(
            f"--version {version}: calibration {name}/{version} already exists; calibrations are immutable, "
            "pick a new version"
        )
    predictor = args.predictor or (deployed.name if deployed else None)
    what = f"{source} (predictor {predictor})" if predictor and args.scores else source
    try:
        qmap = fit_quantile_map(scores, ref.reference, args.min_samples, max_edge_error=MAX_EDGE_ERROR)
    except SampleError as exc:
        raise SampleError(f"{what}: {exc}") from None
    _tie_warnings(edge_misses(scores, qmap, ref.reference, STATUS_TOLERANCE), what)
    calibration = functools.partial(  # what every map of this fit shares
        make_calibration,
        name=name,
        version=version,
        model=target.identity,
        reference_name=ref.name,
        reference=ref.reference,
        beta=target.beta,
        window=_window(frame),
    )
    cals = [calibration(qmap, sample_size=scores.size)]
    groups = None
    if args.by:
        groups = fit_per_group(
            tenant_rows(frame, args.by, scores),
            ref.reference,
            by=args.by,
            min_samples=args.min_samples,
            max_edge_error=MAX_EDGE_ERROR,
            warn_above=STATUS_TOLERANCE,
        )
        cals += [calibration(tmap, sample_size=groups.sizes[t], tenant=t) for t, tmap in groups.maps.items()]
    path = reg.publish_calibration(cals)
    rows = f"{scores.size} scores"
    if "role" in frame.columns and args.scores:
        roles = ", ".join(f"{_shown(r)} {n}" for r, n in frame.group_by("role").len().sort("role").rows())
        rows += f" ({roles})"
    print(
        f"fitted {name}/{version} for {target.label} onto reference {ref.name}: {len(qmap)} knots from {rows} -> {path}"
    )
    _print_rates(ref.reference.edge_rates(), alert_rates(qmap(scores), [e for e, _ in ref.reference.edge_rates()]))
    if groups is not None:
        for tenant, tmap in groups.maps.items():
            print(f"  {args.by} {tenant}: {groups.sizes[tenant]} scores, {len(tmap)} knots")
            _tie_warnings(groups.misses.get(tenant, []), f"{what}, {args.by} {tenant}")
        for tenant, why in groups.skipped.items():
            print(f"  {args.by} {tenant}: skipped, uses the all-traffic map ({why})")
    if deployed is not None:
        print(f'  for predictor {deployed.name}: calibration = "{name}/{version}" in its deployment entry')


def _window(frame: pl.DataFrame) -> tuple[str | None, str | None]:
    if "time" not in frame.columns:
        return None, None
    col = frame["time"]
    return str(col.min()), str(col.max())


def _print_rates(edge_rates, achieved) -> None:
    print("  edge     target   achieved")
    for (edge, target), got in zip(edge_rates, achieved):
        print(f"  {edge:<8.4g} {target:<8.4f} {got:.4f}")


def _margin_kind(reg: Registry, cal: Calibration, ref: str, source: str) -> str:
    """What the margins of calibration ``cal``'s model are, to correct a 'margin' column with."""
    m = cal.model
    with contextlib.suppress(RegistryError):
        manifest = reg.load_model(f"{m.name}/{m.version}").manifest
        if manifest.library_sha256 == m.sha256:
            return manifest.margin_kind
    raise ValueError(
        f"{source}: its 'margin' column needs the model of calibration {ref}, {m.name}/{m.version} "
        f"(sha256 {m.sha256[:12]}), which is no compiled model in the registry (an ensemble's calibration "
        "names its predictor); use --column corrected"
    )


def cmd_report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reg = Registry(args.registry)
    runs = [(args.calibration, args.scores, args.predictor, "--predictor")]
    if args.compare:
        runs.append((args.compare, args.compare_scores or args.scores, args.compare_predictor, "--compare-predictor"))
    elif args.compare_predictor or args.compare_scores:
        raise ValueError("--compare-scores/--compare-predictor: they go with --compare CALIBRATION")
    panels = []
    for ref_name, score_file, predictor, flag in runs:
        cal = reg.load_calibration(ref_name)
        frame = select_predictor(read_table(score_file), predictor, score_file, flag)
        kind = "logit"  # unused unless the scores are margins: then the model says what they are
        if score_column(frame, args.column, score_file) == "margin":
            kind = _margin_kind(reg, cal, ref_name, score_file)
        scores = corrected_scores(frame, args.column, cal.beta, kind, score_file)
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
    source = args.scores or str(reg.score_log)
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
    labels = _load_labels(reg, frame) if args.labels else None
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
        if labels is not None:
            _print_label_metrics(frame.filter(pl.col("intent") == intent), labels, [e for e, _ in edges])
    print(f"{drifted} drifted series" if drifted else "no drift beyond tolerance")
    return 1 if drifted else 0


# -- muse calib status --labels ------------------------------------------------------------------


def _load_labels(reg: Registry, frame: pl.DataFrame) -> pl.DataFrame:
    """The registry's labels (event_id, tenant, label), saying when they cannot be joined to anything."""
    store = LabelStore(reg)
    labels = store.labels().select("event_id", "tenant", "label")
    if labels.height == 0:
        print(f"no labels in {store.directory}: import them with `muse labels import FILE --registry {reg.root}`")
    if frame.height and ("event_id" not in frame.columns or frame["event_id"].null_count() == frame.height):
        print("the score log holds no event ids (files written before they were logged): every event is unlabelled")
    return labels


def _ratio(num: int, den: int) -> str:
    return f"{num / den:.3f}" if den else "-"


def _print_label_metrics(frame: pl.DataFrame, labels: pl.DataFrame, edges: list[float]) -> None:
    events = labelled_events(frame, labels)
    metrics = label_metrics(events, edges)
    shared = shared_ids(events)
    if shared:
        warn(
            f"{shared} event ids labelled without a tenant appear under several tenants, so each label counts for "
            "all of them: give label files a tenant column, or have clients send ids unique across tenants"
        )
    print(
        "  labelled events: alert rate among them, recall (alerts among fraud), precision (fraud among alerts); "
        "'-' when undefined"
    )
    print(
        f"  {'predictor':<14} {'role':<7} {'tenant':<14} {'events':>8} {'labelled':>8} {'unlabelled':>10} "
        f"{'fraud':>7}  {'edge':>6} {'alert rate':>10} {'recall':>7} {'precision':>9}"
    )
    for row in metrics.iter_rows(named=True):
        tenant = row["tenant"] if is_tenant(row["tenant"]) else repr(row["tenant"])  # no control characters
        series = (
            f"  {row['predictor']:<14} {row['role']:<7} {tenant:<14} {row['events']:>8} {row['labelled']:>8} "
            f"{row['events'] - row['labelled']:>10} {row['fraud']:>7}"
        )
        for i, edge in enumerate(edges):
            alerts, caught = row[f"alerts{i}"], row[f"caught{i}"]
            print(
                f"{series if i == 0 else ' ' * len(series)}  {edge:>6g} {_ratio(alerts, row['labelled']):>10} "
                f"{_ratio(caught, row['fraud']):>7} {_ratio(caught, alerts):>9}"
            )
