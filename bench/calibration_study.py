"""Alert rates over a drifting stream, by calibration strategy: Feedzai's study reproduced and
extended with MUSE's automated refresh.

Feedzai's MUSE paper measured how far each reference edge's alert rate drifts from its target
when quantile maps are refitted monthly (median |relative error| 8.7-14.4%) and named automated
refresh as future work.  This study runs every strategy on one stream from the demo's generator
(server/demo/traffic.py):

* **Models**: LightGBM v1 trained on months 0-2 and v2 on months 3-5, negatives kept at
  beta = 0.1, compiled by `muse compile`; every score is the native one.
* **Stream**: ``--months`` months after month 3, ``--rows-per-day`` events a day.  On day d of
  month m an event comes from month m+1's population with probability d/30, else from month
  m's, so the population drifts continuously (the generator is monthly: amounts inflate, online
  traffic grows, and from month 4 the fraud pattern moves).
* **Strategies**: ``raw`` (the model's probability, as trained on undersampled data);
  ``corrected`` (posterior correction only); ``fit once`` (the map fitted on month 3, as
  deployed); ``monthly`` (refit at each month's start on the previous 30 days: the paper's
  practice); ``expanding`` (refit monthly on everything since month 3); ``refresh 1d/7d`` and
  ``refresh 7d/28d`` (the refresher's own plan, muse.core.refresh.plan_refresh, with the
  guardrails of `muse refresher` and the policy's every/window, run on the stream's clock; a
  refused plan keeps the live map, counted); ``v2, v1's map`` (a retrained model shipped under
  the old model's map: what a model update without recalibration does) and ``v2, refresh
  1d/7d`` (the retrained model, its map fitted on month 3 and then refreshed).  v2 is trained on
  the stream's first three months (generator months 3-5), so its rows in months 1-2 of the
  tables are in-sample.
* **Measured**, each day from month 4 on: the alert rate at each reference edge under each
  strategy, and |rate - target| / target; medians per month and over all days; recall at each
  edge per month from labels stored with muse.core.labels (as `muse labels import` stores them)
  and joined back to the events by event id.  A PNG (``--png``) draws the daily alert rate at
  two edges per strategy.

    python -m muse.bench.calibration_study [--rows-per-day 20000] [--months 6] [--png FILE] [--json FILE]

Issue 16's done-means: refresh's median |relative error| within 5% at every edge in the months
after its first refresh, while fit once drifts beyond 25%."""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from muse.calib import QuantileMap, alert_rates, correct_margins, fit_quantile_map
from muse.calib.quantile_map import MAX_EDGE_ERROR
from muse.compile import CompiledModel, build_artifact, load_artifact
from muse.core.labels import LabelStore
from muse.core.refresh_plan import LiveMaps, plan_refresh
from muse.core.registry import Registry
from muse.core.spec import RefreshSpec, parse_duration
from muse.server.demo import BETA_V1, LIGHTGBM, REFERENCE, traffic

DAYS_PER_MONTH = 30
FIRST_MONTH = 3  # the month the deployed maps are fitted on; the tables start the month after
EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
EDGES = [float(e) for e in REFERENCE.edges]
TARGETS = np.array([float(r) for r in REFERENCE.rates])
PLOTTED_EDGES = (0.5, 0.8)


def train(work: pathlib.Path, name: str, months: range, trees: int, rows: int = 20_000) -> CompiledModel:
    import lightgbm as lgb

    parts = [traffic.generate_mix(m, rows, seed=1) for m in months]
    X = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    Xs, ys = traffic.undersample(X, y, BETA_V1, seed=1)
    ds = lgb.Dataset(Xs, ys, feature_name=traffic.FEATURES, categorical_feature=["merchant_category"])
    path = work / f"{name}.txt"
    lgb.train(dict(LIGHTGBM, seed=1), ds, num_boost_round=trees).save_model(str(path))
    return load_artifact(build_artifact(path, work / "registry" / "models", name=name, beta=BETA_V1))


def day_events(day: int, rows_per_tenant: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Day ``day`` counted from month 3's first: features, labels, tenants."""
    month, d = divmod(day, DAYS_PER_MONTH)
    month += FIRST_MONTH
    X0, y0, t0 = traffic.generate_mix(month, rows_per_tenant, seed=10_000 + day)
    X1, y1, _ = traffic.generate_mix(month + 1, rows_per_tenant, seed=20_000 + day)
    later = np.random.default_rng(30_000 + day).random(y0.size) < d / DAYS_PER_MONTH
    return np.where(later[:, None], X1, X0), np.where(later, y1, y0), t0


def stream(models: dict[str, CompiledModel], days: int, rows_per_day: int) -> pl.DataFrame:
    """Every event: day, time, tenant, event id, label, and each model's margin."""
    per_tenant = rows_per_day // len(traffic.TENANTS)
    parts = []
    for day in range(days):
        X, y, tenants = day_events(day, per_tenant)
        n = y.size
        start_us = int((EPOCH + datetime.timedelta(days=day)).timestamp() * 1e6)
        parts.append(
            pl.DataFrame(
                {
                    "day": np.full(n, day, dtype=np.int32),
                    "time": start_us + np.arange(n, dtype=np.int64) * (86_400_000_000 // n),
                    "tenant": tenants,
                    "label": y.astype(np.int8),
                    **{name: model.predict(X, margin=True) for name, model in models.items()},
                }
            ).with_columns(
                pl.col("time").cast(pl.Datetime("us", "UTC")),
                pl.concat_str(pl.lit(f"d{day}-"), pl.int_range(n).cast(pl.String)).alias("event_id"),
            )
        )
    return pl.concat(parts)


def fit(scores: np.ndarray) -> QuantileMap:
    return fit_quantile_map(scores, REFERENCE, max_edge_error=MAX_EDGE_ERROR)


@dataclass
class Strategy:
    """A way of turning a day's corrected scores into served scores, told each day's start."""

    name: str
    model: str  # "v1" or "v2"
    serve: Callable[[np.ndarray], np.ndarray]
    start_of_day: Callable[[int], None] = lambda day: None
    refused: int = 0
    rates: list[np.ndarray] = field(default_factory=list)  # per day: alert rate at each edge
    recall: list[np.ndarray] = field(default_factory=list)  # per day: recall at each edge


class Stream:
    """The stream's corrected scores by model, sliced by day."""

    def __init__(self, events: pl.DataFrame, betas: dict[str, float]):
        self.events = events
        self.corrected = {m: correct_margins(events[m].to_numpy(), beta) for m, beta in betas.items()}
        self.raw = {m: 1.0 / (1.0 + np.exp(-events[m].to_numpy())) for m in betas}
        day = events["day"].to_numpy()
        self.bounds = np.searchsorted(day, np.arange(int(day.max()) + 2))

    def days(self, model: str, first: int, last: int) -> np.ndarray:
        """Corrected scores of ``model`` on days [first, last)."""
        return self.corrected[model][self.bounds[max(first, 0)] : self.bounds[last]]


def refitted_monthly(s: Stream, model: str, name: str, deployed: QuantileMap, expanding: bool) -> Strategy:
    live = {"map": deployed}

    def start(day: int) -> None:
        if day % DAYS_PER_MONTH == 0:
            live["map"] = fit(s.days(model, 0 if expanding else day - DAYS_PER_MONTH, day))

    return Strategy(name, model, lambda x: live["map"](x), start)


def refreshed(s: Stream, model: str, name: str, deployed: QuantileMap, every: str, window: str) -> Strategy:
    """The refresher's plan for a policy of ``every``/``window``, run when due on the stream's clock."""
    policy = RefreshSpec(predictor=name, every=every, window=window)
    every_days = parse_duration("every", every).days
    window_days = parse_duration("window", window).days
    live = {"map": deployed}
    strategy = Strategy(name, model, lambda x: live["map"](x))

    def start(day: int) -> None:
        if (day - DAYS_PER_MONTH) % every_days:
            return
        lo, hi = s.bounds[max(day - window_days, 0)], s.bounds[day]
        rows = s.events.slice(lo, hi - lo).select("time", "tenant").with_columns(corrected=s.corrected[model][lo:hi])
        plan = plan_refresh(name, rows, REFERENCE, LiveMaps(live["map"]), policy)
        if plan.ok and plan.overall.qmap is not None:
            live["map"] = plan.overall.qmap
        else:
            strategy.refused += 1

    strategy.start_of_day = start
    return strategy


def strategies(s: Stream) -> list[Strategy]:
    month3 = {m: fit(s.days(m, 0, DAYS_PER_MONTH)) for m in ("v1", "v2")}
    return [
        Strategy("raw", "v1", lambda x: x),
        Strategy("corrected", "v1", lambda x: x),
        Strategy("fit once", "v1", month3["v1"]),
        refitted_monthly(s, "v1", "monthly", month3["v1"], expanding=False),
        refitted_monthly(s, "v1", "expanding", month3["v1"], expanding=True),
        refreshed(s, "v1", "refresh 1d/7d", month3["v1"], "1d", "7d"),
        refreshed(s, "v1", "refresh 7d/28d", month3["v1"], "7d", "28d"),
        Strategy("v2, v1's map", "v2", month3["v1"]),
        refreshed(s, "v2", "v2, refresh 1d/7d", month3["v2"], "1d", "7d"),
    ]


def run(rows_per_day: int, months: int, trees: int) -> tuple[list[Strategy], float]:
    days = DAYS_PER_MONTH * (months + 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        t0 = time.perf_counter()
        models = {
            "v1": train(work, "v1", range(0, FIRST_MONTH), trees),
            "v2": train(work, "v2", range(FIRST_MONTH, FIRST_MONTH + 3), trees),
        }
        events = stream(models, days, rows_per_day)
        # the labels come back through the label store, joined by event id
        store = LabelStore(Registry(work / "registry"))
        store.append(events.select("event_id", "label"))
        labelled = events.select("event_id").join(store.labels().select("event_id", "label"), on="event_id", how="left")
        assert labelled.height == events.height and labelled["label"].null_count() == 0
        labels = labelled["label"].to_numpy().astype(bool)
        seconds = time.perf_counter() - t0
    s = Stream(events, {name: m.manifest.beta for name, m in models.items()})
    print(f"v1, v2 trained and compiled; {events.height:,} events over {days} days scored in {seconds:.0f} s")
    plan = strategies(s)
    for day in range(DAYS_PER_MONTH, days):
        lo, hi = s.bounds[day], s.bounds[day + 1]
        frauds = labels[lo:hi]
        for st in plan:
            st.start_of_day(day)
            source = s.raw if st.name == "raw" else s.corrected
            served = st.serve(source[st.model][lo:hi])
            st.rates.append(alert_rates(served, EDGES))
            st.recall.append(np.array([np.sum(served[frauds] >= e) for e in EDGES]) / max(frauds.sum(), 1))
    return plan, float(labels.mean())


def monthly(values: list[np.ndarray], months: int, how: Callable) -> list[np.ndarray]:
    per_day = np.array(values)
    return [how(per_day[m * DAYS_PER_MONTH : (m + 1) * DAYS_PER_MONTH], axis=0) for m in range(months)]


def report(plan: list[Strategy], months: int) -> dict:
    header = "".join(f"{'>= ' + format(e, 'g'):>9}" for e in EDGES)
    print(f"\nmedian over days of |alert rate - target| / target (targets {', '.join(f'{t:g}' for t in TARGETS)})")
    print(f"  {'strategy':<20}{'month':>6}{header}")
    result: dict = {"edges": EDGES, "targets": TARGETS.tolist(), "strategies": {}}
    for st in plan:
        errors = [np.abs(r - TARGETS) / TARGETS for r in st.rates]
        by_month = monthly(errors, months, np.median)
        recall = monthly(st.recall, months, np.mean)
        for m, row in enumerate(by_month):
            print(f"  {st.name if m == 0 else '':<20}{m + 1:>6}" + "".join(f"{v:>9.1%}" for v in row))
        overall = np.median(np.array(errors), axis=0)
        print(f"  {'':<20}{'all':>6}" + "".join(f"{v:>9.1%}" for v in overall))
        result["strategies"][st.name] = {
            "error_by_month": [r.tolist() for r in by_month],
            "error_overall": overall.tolist(),
            "recall_by_month": [r.tolist() for r in recall],
            "refused_refreshes": st.refused,
        }
    print(f"\nrecall at each edge (labels joined by event id), mean over days\n  {'strategy':<20}{'month':>6}{header}")
    for st in plan:
        for m, row in enumerate(result["strategies"][st.name]["recall_by_month"]):
            print(f"  {st.name if m == 0 else '':<20}{m + 1:>6}" + "".join(f"{v:>9.3f}" for v in row))
    for st in plan:
        if st.name.startswith(("refresh", "v2, refresh")):
            print(f"{st.name}: {st.refused} refreshes refused by the guardrails")
    return result


def plot(plan: list[Strategy], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED_EDGES), figsize=(15, 5), sharex=True)
    for ax, edge in zip(axes, PLOTTED_EDGES):
        i = EDGES.index(edge)
        for st in plan:
            if st.name in ("raw", "corrected"):  # far off the scale of the others: in the table
                continue
            days = np.arange(len(st.rates)) + 1
            ax.plot(days, [r[i] for r in st.rates], label=st.name, lw=1.6 if "refresh" in st.name else 1.0)
        ax.axhline(TARGETS[i], color="k", ls="--", label="target")
        for m in range(1, len(plan[0].rates) // DAYS_PER_MONTH):
            ax.axvline(m * DAYS_PER_MONTH + 0.5, color="0.85", lw=0.8)
        ax.set(title=f"Alert rate at or above {edge:g}, day by day", xlabel="day after the map's month", ylabel="rate")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows-per-day", type=int, default=20_000)
    parser.add_argument("--months", type=int, default=6, help="months scored after the calibration month")
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--png", help="draw the daily alert rates here")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    plan, fraud_rate = run(args.rows_per_day, args.months, args.trees)
    print(f"fraud rate of the stream: {fraud_rate:.4f}")
    result = report(plan, args.months)
    if args.png:
        plot(plan, args.png)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
