"""`muse score` (muse.core.file_scoring): a file's rows through the compiled model and the
calibration the server uses, in chunks across threads, order kept."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import numpy as np
import polars as pl
import pytest
from conftest import get_case
from helpers import calibrated_registry, make_registry, rows

from muse.calib import MapTable, identity_map
from muse.compile import native_map_table
from muse.core.file_scoring import balanced_chunk_rows, chunk_spans, model_scorer, plan_input, score_file
from muse.core.snapshot import ModelPool, build_snapshot
from muse.core.spec import DeploymentSpec, PredictorSpec, RefreshSpec, RouteSpec
from muse.server.cli import main as cli
from muse.server.testing import deploy

N = 1000
SPEC = DeploymentSpec(
    predictors=[
        PredictorSpec("a", "3", "fraud", ["lightgbm/1"], calibration="lightgbm/1"),
        PredictorSpec("ens", "1", "fraud", ["lightgbm/1", "lightgbm-copy/1"]),
    ],
    routes=[RouteSpec("*", "fraud", "a", shadows=["ens"])],
    refresh=[RefreshSpec("ens", every="1d")],  # about another predictor than the one scored: no matter
)


@pytest.fixture(scope="module")
def reg(tmp_path_factory, model_dir):
    reg = calibrated_registry(tmp_path_factory.mktemp("score"), model_dir)
    deploy(reg, SPEC)
    return reg


@pytest.fixture(scope="module")
def model(reg):
    return reg.load_model("lightgbm/1")


@pytest.fixture(scope="module")
def X():
    X = rows(N, seed=41)
    X[7] = np.nan  # a row of missing values only
    return X


def names(model) -> list[str]:
    return list(model.manifest.feature_names)


def features_frame(model, X, nulls: bool = True) -> pl.DataFrame:
    """id (descending: order is not sorted order), an extra column, then the features in
    reverse order; missing values as null in half the columns, NaN in the others."""
    frame = pl.DataFrame({"id": np.arange(len(X))[::-1] * 10, "label": np.arange(len(X)) % 2})
    cols = {n: X[:, i] for i, n in enumerate(names(model))}
    frame = frame.with_columns(pl.Series(n, cols[n]) for n in reversed(names(model)))
    if nulls:
        frame = frame.with_columns(pl.col(names(model)[::2]).fill_nan(None))
    return frame


def expected(model, X, cal=None):
    maps = [identity_map()] + ([cal.quantile_map()] if cal is not None else [])
    return model.score(X, native_map_table(MapTable(maps)), len(maps) - 1)


def score(reg, inp, out, *extra):
    return cli(["score", "--registry", str(reg.root), "--input", str(inp), "--output", str(out), *extra])


def assert_scores(out: pl.DataFrame, scores, ids=None):
    assert out.columns[-5:] == ["margin", "corrected", "mapped", "predictor", "version"]
    for field in ("margin", "corrected", "mapped"):
        assert np.array_equal(out[field].to_numpy(), getattr(scores, field)), field  # bit for bit
    if ids is not None:
        assert out.columns[0] == "id" and out["id"].to_list() == list(ids)


@pytest.mark.parametrize("threads", [1, 3])
def test_model_and_tenant_map_equal_compiled_score_across_chunks(reg, model, X, tmp_path, capsys, threads):
    frame = features_frame(model, X)
    frame.write_parquet(tmp_path / "in.parquet", row_group_size=300)
    args = ["--model", "lightgbm/1", "--calibration", "lightgbm", "--tenant", "acme"]
    assert (
        score(
            reg,
            tmp_path / "in.parquet",
            tmp_path / "out.parquet",
            *args,
            "--chunk-rows",
            "37",
            "--threads",
            str(threads),
        )
        == 0
    )
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.columns == ["id", "margin", "corrected", "mapped", "predictor", "version"]
    assert_scores(out, expected(model, X, reg.load_calibration("lightgbm", tenant="acme")), frame["id"])
    assert out["predictor"].unique().to_list() == ["lightgbm"] and out["version"].unique().to_list() == ["1"]
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"scored 1,000 rows of {tmp_path / 'in.parquet'}" in line
    assert (
        f"{threads} threads, {len(chunk_spans([300, 300, 300, 100], balanced_chunk_rows(N, 37, threads)))} chunks"
        in line
        and "tenant acme's map" in line
        and "features by name" in line
    )


def test_threads_and_chunks_do_not_change_the_output(reg, model, X, tmp_path):
    features_frame(model, X).write_parquet(tmp_path / "in.parquet")
    outputs = []
    for threads, chunk in [(1, 1000), (1, 64), (2, 7), (4, 250), (8, 3)]:
        out = tmp_path / f"out-{threads}-{chunk}.parquet"
        args = ["--model", "lightgbm", "--calibration", "lightgbm/1", "--threads", str(threads)]
        assert score(reg, tmp_path / "in.parquet", out, *args, "--chunk-rows", str(chunk)) == 0
        outputs.append(pl.read_parquet(out))
    for other in outputs[1:]:
        assert other.equals(outputs[0])
    assert_scores(outputs[0], expected(model, X, reg.load_calibration("lightgbm")))


def test_csv_with_names_reordered_extra_columns_and_missing_values(reg, model, X, tmp_path):
    frame = features_frame(model, X)
    frame.write_csv(tmp_path / "in.csv")  # nulls as empty fields, NaN as "NaN"
    assert "NaN" in (tmp_path / "in.csv").read_text() and ",," in (tmp_path / "in.csv").read_text()
    assert (
        score(
            reg,
            tmp_path / "in.csv",
            tmp_path / "out.parquet",
            "--model",
            "lightgbm",
            "--chunk-rows",
            "100",
            "--threads",
            "2",
        )
        == 0
    )
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert_scores(out, expected(model, X), frame["id"])
    assert np.array_equal(out["mapped"].to_numpy(), out["corrected"].to_numpy())  # no calibration: unmapped


def test_by_position_and_id_column(reg, model, X, tmp_path, capsys):
    frame = pl.DataFrame({"key": [f"event-{i}" for i in range(N)], **{f"x{i}": X[:, i] for i in range(X.shape[1])}})
    frame.write_parquet(tmp_path / "in.parquet")
    out_path = tmp_path / "out.parquet"
    args = ["--model", "lightgbm", "--id-column", "key", "--chunk-rows", "128"]
    assert score(reg, tmp_path / "in.parquet", out_path, *args) == 0
    out = pl.read_parquet(out_path)
    assert out.columns[0] == "key" and out["key"].to_list() == frame["key"].to_list()
    assert_scores(out, expected(model, X))
    assert "features by position, id column 'key'" in capsys.readouterr().out

    # without an id column: scores only; a CSV without a header: by position
    pl.DataFrame({f"x{i}": X[:, i] for i in range(X.shape[1])}).write_csv(tmp_path / "bare.csv", include_header=False)
    assert score(reg, tmp_path / "bare.csv", out_path, "--model", "lightgbm", "--chunk-rows", "99") == 0
    out = pl.read_parquet(out_path)
    assert out.columns == ["margin", "corrected", "mapped", "predictor", "version"] and len(out) == N
    assert_scores(out, expected(model, X))


def test_deployed_predictor_tenant_map_and_ensemble_equal_predictor_score(reg, X, tmp_path, capsys):
    snapshot = build_snapshot(SPEC, ModelPool(reg), generation=1)
    features_frame(snapshot.predictors["a"].batchers[0].model, X).write_parquet(tmp_path / "in.parquet")
    for name, tenant in [("a", "acme"), ("a", None), ("a", "nobody"), ("ens", "acme")]:
        predictor = snapshot.predictors[name]
        args = ["--predictor", name, "--chunk-rows", "50", "--threads", "2"] + (["--tenant", tenant] if tenant else [])
        assert score(reg, tmp_path / "in.parquet", tmp_path / "out.parquet", *args) == 0
        out = pl.read_parquet(tmp_path / "out.parquet")
        index = predictor.map_index(tenant) if tenant else predictor.maps[None]
        assert_scores(out, predictor.score(X, index))
        assert out["predictor"].unique().to_list() == [name]
        assert out["version"].unique().to_list() == [predictor.version]
    a = snapshot.predictors["a"]
    assert a.map_index("acme") != a.maps[None]  # the tenant's map was a different one
    said = capsys.readouterr().out
    assert "no map of nobody's own" in said and "predictor ens version 1" in said


def test_empty_input_gives_an_empty_output(reg, model, tmp_path):
    features_frame(model, np.empty((0, model.num_feature))).write_parquet(tmp_path / "in.parquet")
    assert score(reg, tmp_path / "in.parquet", tmp_path / "out.parquet", "--model", "lightgbm") == 0
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert len(out) == 0 and out.columns == ["id", "margin", "corrected", "mapped", "predictor", "version"]


def test_library_call_reports_progress_and_summary(reg, model, X, tmp_path):
    features_frame(model, X).write_parquet(tmp_path / "in.parquet")
    scorer = model_scorer(reg, "lightgbm")
    plan = plan_input(tmp_path / "in.parquet", scorer.feature_names)
    seen = []
    summary = score_file(
        scorer, plan, tmp_path / "out.parquet", threads=2, chunk_rows=300, progress=lambda d, s: seen.append(d)
    )
    assert seen == [250, 500, 750, 1000] and (summary.rows, summary.chunks, summary.threads) == (N, 4, 2)


def test_parquet_chunks_are_whole_row_groups():
    assert chunk_spans([125, 125, 125, 125], 300) == [(0, 250), (250, 250)]
    assert chunk_spans([1000], 300) == [(0, 250), (250, 250), (500, 250), (750, 250)]  # cut in equal parts
    assert chunk_spans([10, 500, 20, 20], 100) == [(0, 10), *[(10 + 100 * k, 100) for k in range(5)], (510, 40)]
    assert chunk_spans([0, 5, 0], 5) == [(0, 5)] and chunk_spans([], 5) == []
    assert chunk_spans([3], 1) == [(0, 1), (1, 1), (2, 1)]


def test_chunks_come_in_whole_rounds_of_threads():
    assert balanced_chunk_rows(1_000_000, 262_144, 2) == 250_000  # 4 chunks: 2 rounds of 2
    assert balanced_chunk_rows(1_000_000, 262_144, 1) == 250_000  # 4 chunks, not 3 and a remainder
    assert balanced_chunk_rows(20_000, 262_144, 4) == 5_000  # a small file: a chunk a thread
    assert balanced_chunk_rows(3, 100, 8) == 1 and balanced_chunk_rows(0, 100, 2) == 1
    assert balanced_chunk_rows(1_100_000, 262_144, 2) == 183_334  # 3 rounds of 2, not 4 and 1 alone


def test_row_groups_are_read_from_the_footers(model, X, tmp_path):
    from muse.core.file_scoring import _row_groups

    frame = features_frame(model, X)
    frame.write_parquet(tmp_path / "in.parquet", row_group_size=300)
    assert _row_groups(tmp_path / "in.parquet") == [300, 300, 300, 100]
    (tmp_path / "dir").mkdir()
    frame[:450].write_parquet(tmp_path / "dir" / "b.parquet", row_group_size=200)
    frame[450:].write_parquet(tmp_path / "dir" / "a.parquet", row_group_size=500)
    assert _row_groups(tmp_path / "dir") == [500, 50, 200, 200, 50]  # a.parquet first, as Polars reads them
    (tmp_path / "in.csv").write_text("not parquet")
    assert _row_groups(tmp_path / "in.csv") is None


def test_progress_line_on_a_terminal(reg, model, X, tmp_path, capsys, monkeypatch):
    features_frame(model, X).write_parquet(tmp_path / "in.parquet")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert (
        score(reg, tmp_path / "in.parquet", tmp_path / "out.parquet", "--model", "lightgbm", "--chunk-rows", "10") == 0
    )
    err = capsys.readouterr().err
    assert err.endswith("scoring: 1,000/1,000 rows (100%), " + err.rsplit(", ", 1)[1])
    assert err.endswith(" rows/s\n")


def write_bad_csv(path: pathlib.Path, model, X):
    frame = features_frame(model, X).with_columns(pl.col(names(model)[0]).cast(pl.String))
    frame = frame.with_columns(
        pl.when(pl.col("id") == 30).then(pl.lit("abc")).otherwise(pl.col(names(model)[0])).alias(names(model)[0])
    )
    frame.write_csv(path)


@pytest.mark.parametrize(
    "make, args, words",
    [
        (None, ["--model", "lightgbm"], "missing.parquet: no such file"),
        ("txt", ["--model", "lightgbm"], "in.txt: unknown file type; --input takes a .parquet or .csv"),
        ("partial", ["--model", "lightgbm"], "has 5 of the model's 6 feature columns but not Column_3"),
        (
            "seven",
            ["--model", "lightgbm"],
            "7 columns besides the id column 'id' and none named as the model's features",
        ),
        ("string", ["--model", "lightgbm"], "feature column 'Column_1' is String, not numeric"),
        (
            "badcsv",
            ["--model", "lightgbm", "--chunk-rows", "100"],
            "could not parse `abc` as dtype `f64` at column 'Column_0'",
        ),
        ("good", ["--model", "lightgbm", "--id-column", "event"], "no column 'event' for --id-column"),
        ("good", ["--model", "lightgbm", "--output", "{tmp}/out.csv"], "out.csv: scores are written as Parquet"),
        ("good", ["--model", "lightgbm", "--output", "{tmp}/nowhere/out.parquet"], "no directory"),
        ("good", ["--model", "lightgbm", "--output", "{tmp}/in.parquet"], "the input file itself"),
        ("good", ["--model", "lightgbm", "--calibration", "xgb-cal"], "fitted for xgboost-json/1"),
        ("good", ["--model", "lightgbm", "--tenant", "acme"], "--tenant picks a tenant's map of a calibration"),
        ("good", ["--model", "nope"], "model 'nope' is not in"),
        ("good", ["--predictor", "zzz"], "--predictor zzz: not in the current deployment"),
        ("good", ["--predictor", "a", "--calibration", "lightgbm"], "--calibration goes with --model"),
        ("good", ["--model", "lightgbm", "--threads", "0"], "--threads 0: give 1 or more"),
        ("good", ["--model", "lightgbm", "--chunk-rows", "0"], "--chunk-rows 0: give 1 or more"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_leave_no_output(reg, model, X, tmp_path, capsys, make, args, words):
    frame = features_frame(model, X)
    inp = tmp_path / "in.parquet"
    if make == "txt":
        inp = tmp_path / "in.txt"
        frame.write_csv(inp)
    elif make == "partial":
        frame.drop("Column_3").write_parquet(inp)
    elif make == "seven":
        frame.drop(names(model)).with_columns(pl.lit(1.0).alias(f"v{i}") for i in range(6)).write_parquet(inp)
    elif make == "string":
        frame.with_columns(pl.col("Column_1").cast(pl.String)).write_parquet(inp)
    elif make == "badcsv":
        inp = tmp_path / "in.csv"
        write_bad_csv(inp, model, X[::-1])  # id 30 is row 997: the error comes in the last chunk
    elif make == "good":
        frame.write_parquet(inp)
    else:
        inp = tmp_path / "missing.parquet"
    args = [a.format(tmp=tmp_path) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out.parquet")]
    assert cli(["score", "--registry", str(reg.root), "--input", str(inp), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("muse score: error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err
    left = {p.name for p in tmp_path.iterdir()} - {inp.name}
    assert left == set(), left  # no output, no temporary file


def test_no_deployment_is_an_error_naming_the_fix(tmp_path, model_dir, capsys):
    case = get_case("lightgbm", model_dir, tmp_path / "compiled")
    fresh = make_registry(tmp_path / "fresh", {"lightgbm": case})
    features_frame(case.model, rows(10, seed=1)).write_parquet(tmp_path / "in.parquet")
    assert score(fresh, tmp_path / "in.parquet", tmp_path / "out.parquet", "--predictor", "a") == 2
    err = capsys.readouterr().err
    assert "deployments/current: no deployment is current; apply one with `muse deploy apply`" in err


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_chunks_in_flight_stay_bounded(reg, model, X, tmp_path, monkeypatch, kind):
    """Memory does not grow with the file: a chunk is read only while fewer than AHEAD x threads
    are read and not yet written, however slow one chunk is.  (That Polars reads no further
    ahead on its own is measured by bench/offline_scoring.py: peak memory on 1M and 3M rows.)"""
    import threading

    from muse.core import file_scoring
    from muse.server.testing import wait_until

    inp = tmp_path / f"in.{kind}"
    frame = features_frame(model, X)
    if kind == "parquet":
        frame.write_parquet(inp)
    else:
        frame.write_csv(inp)
    scorer = model_scorer(reg, "lightgbm")
    calls = [0]

    lock, held, ahead = threading.Lock(), [0], []
    threads = 3
    bound = file_scoring.AHEAD * threads

    def slow(Z):
        with lock:
            calls[0] += 1
            first = calls[0] == 1
        if first:  # held until every other worker has run as far ahead of the writer as it may
            wait_until(lambda: max(ahead, default=0) >= bound, 60, "the workers to reach the bound")
        return scorer.score(Z)

    class Counting(threading.Semaphore):
        """The run's places for chunks in flight, counted as they are taken and given back."""

        def acquire(self, blocking=True, timeout=None):
            got = super().acquire(blocking, timeout)
            if got:
                with lock:
                    held[0] += 1
                    ahead.append(held[0])
            return got

        def release(self, n=1):
            with lock:
                held[0] -= n
            super().release(n)

    init = file_scoring._Run.__init__

    def counting(self, threads, total):
        init(self, threads, total)
        self._room = Counting(file_scoring.AHEAD * threads)

    monkeypatch.setattr(file_scoring._Run, "__init__", counting)
    plan = plan_input(inp, scorer.feature_names)
    summary = score_file(
        dataclasses.replace(scorer, score=slow), plan, tmp_path / "out.parquet", threads=threads, chunk_rows=20
    )
    assert summary.chunks == N // 20 and max(ahead) == bound  # reached, never passed
    assert_scores(pl.read_parquet(tmp_path / "out.parquet"), expected(model, X))


def test_threads_take_whole_chunks_in_any_order_and_the_output_keeps_the_input_order(reg, model, X, tmp_path):
    """Each thread reads, converts and scores whole chunks; chunks finish out of order (here the
    even ones are slow) and are written in order: the same bytes for 1 thread and for 3."""
    import time

    frame = features_frame(model, X)
    frame.write_parquet(tmp_path / "in.parquet", row_group_size=130)
    scorer = model_scorer(reg, "lightgbm", calibration="lightgbm")
    plan = plan_input(tmp_path / "in.parquet", scorer.feature_names)

    def uneven(Z):
        time.sleep(0.02 if len(Z) % 2 == 0 else 0)
        return scorer.score(Z)

    outputs = []
    for threads, chunk in [(1, 1000), (1, 37), (3, 37), (3, 130), (3, 300)]:
        out = tmp_path / f"out-{threads}-{chunk}.parquet"
        slow = dataclasses.replace(scorer, score=uneven)
        summary = score_file(slow, plan, out, threads=threads, chunk_rows=chunk)
        assert summary.chunks == len(chunk_spans([130] * 7 + [90], balanced_chunk_rows(N, chunk, threads)))
        outputs.append(pl.read_parquet(out))
    for other in outputs[1:]:
        assert other.equals(outputs[0])
    assert_scores(outputs[0], expected(model, X, reg.load_calibration("lightgbm")), frame["id"])


def test_float32_features_are_scored_as_float32_with_the_same_scores(reg, model, X, tmp_path):
    """Features whose every value is a float32 go to the native call as float32 (half the copy):
    the scores are those of the same values as float64."""
    X32 = X.astype(np.float32)
    small = pl.col(names(model)[1]).fill_nan(None).mul(10).round(0).cast(pl.Int16)  # nulls kept: missing
    frame = features_frame(model, X32).with_columns(small)
    frame.write_parquet(tmp_path / "in.parquet")
    scorer = model_scorer(reg, "lightgbm")
    plan = plan_input(tmp_path / "in.parquet", scorer.feature_names)
    assert plan.dtype == pl.Float32
    seen = []
    recording = dataclasses.replace(scorer, score=lambda Z: (seen.append(Z.dtype), scorer.score(Z))[1])
    score_file(recording, plan, tmp_path / "out.parquet", threads=2, chunk_rows=300)
    assert set(seen) == {np.dtype(np.float32)}
    as64 = frame.select(pl.col(names(model)).cast(pl.Float64)).to_numpy()
    assert_scores(pl.read_parquet(tmp_path / "out.parquet"), expected(model, as64), frame["id"])
    frame.with_columns(pl.col(names(model)[2]).cast(pl.Int32)).write_parquet(tmp_path / "in64.parquet")
    assert plan_input(tmp_path / "in64.parquet", scorer.feature_names).dtype == pl.Float64  # an int32 may not be


def test_unreadable_row_groups_only_cost_time(reg, model, X, tmp_path, monkeypatch):
    from muse.core import file_scoring

    features_frame(model, X).write_parquet(tmp_path / "in.parquet", row_group_size=100)

    monkeypatch.setattr(file_scoring, "_row_groups", lambda path: None)  # pyarrow absent, or a footer it cannot read
    scorer = model_scorer(reg, "lightgbm")
    plan = plan_input(tmp_path / "in.parquet", scorer.feature_names)
    assert file_scoring.parquet_spans(plan, 300, 2) == [(0, 250), (250, 250), (500, 250), (750, 250)]
    summary = score_file(scorer, plan, tmp_path / "out.parquet", threads=2, chunk_rows=300)
    assert summary.chunks == 4
    assert_scores(pl.read_parquet(tmp_path / "out.parquet"), expected(model, X))


def test_a_failure_midway_leaves_no_output_and_no_thread(reg, model, X, tmp_path):
    import threading

    features_frame(model, X).write_parquet(tmp_path / "in.parquet")
    scorer = model_scorer(reg, "lightgbm")
    calls = [0]

    def failing(Z):
        calls[0] += 1
        if calls[0] == 7:
            raise RuntimeError("the model failed")
        return scorer.score(Z)

    plan = plan_input(tmp_path / "in.parquet", scorer.feature_names)
    with pytest.raises(RuntimeError, match="the model failed"):
        score_file(dataclasses.replace(scorer, score=failing), plan, tmp_path / "out.parquet", threads=2, chunk_rows=50)
    assert {p.name for p in tmp_path.iterdir()} == {"in.parquet"}
    assert not [t for t in threading.enumerate() if t.name.startswith("muse-score")]


def test_a_parquet_directory_is_read_in_file_order(reg, model, X, tmp_path):
    frame = features_frame(model, X)
    (tmp_path / "in").mkdir()
    frame[:400].write_parquet(tmp_path / "in" / "part-0.parquet")
    frame[400:].write_parquet(tmp_path / "in" / "part-1.parquet")
    assert score(reg, tmp_path / "in", tmp_path / "out.parquet", "--model", "lightgbm", "--chunk-rows", "150") == 0
    assert_scores(pl.read_parquet(tmp_path / "out.parquet"), expected(model, X), frame["id"])
