"""Score samples from wherever they live: NumPy, Polars, Parquet or CSV.

Per-tenant fitting reads the sample once and splits it with one Polars
group-by; tenants below the minimum size (or, with ``max_edge_error``, whose
ties leave an edge unreachable) are reported, not fitted, and fall back to
the intent-wide map."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from .quantile_map import DEFAULT_MIN_SAMPLES, EdgeMiss, QuantileMap, SampleError, edge_misses, fit_quantile_map
from .reference import Reference

# Where a score sample can come from: an array, a Polars Series or DataFrame, or a file path.
ScoreSource = pl.DataFrame | pl.Series | np.ndarray | str | os.PathLike[str]


def is_url(path: str | os.PathLike[str]) -> bool:
    """A location on object storage (s3://bucket/prefix...), read by Polars itself with the
    credentials and endpoint of the standard AWS_* environment."""
    return isinstance(path, str) and "://" in path


def scan_url(url: str) -> pl.LazyFrame:
    """Every Parquet file under ``url`` (a score log uploaded by replicas: scorelog/replica=ID/...),
    or the one file ``url`` names, as one frame; a column a file lacks is null in its rows."""
    pattern = url if url.endswith(".parquet") else f"{url.rstrip('/')}/**/*.parquet"
    return pl.scan_parquet(pattern, hive_partitioning=False, missing_columns="insert")


def read_table(path: str | os.PathLike[str]) -> pl.DataFrame:
    """A Parquet file, a directory of Parquet files (a score log, or any other) or a CSV file,
    local or at a URL."""
    if is_url(path) or pathlib.Path(path).is_dir():  # read again if the log's budget deletes a file meanwhile
        where = str(path) if is_url(path) else pathlib.Path(path)
        frame = query_score_log(where, lambda f: f, pattern="*.parquet")
        if frame is None:
            raise SampleError(f"{path}: no Parquet files")
        return frame
    path = pathlib.Path(path)
    if not path.exists():
        raise SampleError(f"{path}: no such file")
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        if path.suffix in (".csv", ".txt"):
            return pl.read_csv(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise SampleError(f"{path}: cannot read ({exc})") from None
    raise SampleError(f"{path}: unknown file type; use .parquet or .csv")


def scan_parquet_files(files: list[pathlib.Path], where: pathlib.Path) -> pl.LazyFrame:
    """Parquet files as one frame, whose columns are all the files' (in the order first seen):
    a column a file lacks is null in its rows.  So a score log read as one holds files written
    before a column was added (server/scorelog.py: request_id, event_id) beside newer ones,
    whichever comes first -- a scan of several files takes its columns from the first, and
    ``missing_columns="insert"`` alone still refuses a later file's extra columns."""
    if not files:
        raise SampleError(f"{where}: no Parquet files")
    return pl.concat([pl.scan_parquet(f) for f in files], how="diagonal")


READ_TRIES = 3  # the server deletes its oldest files to keep its budget, maybe while they are read


SCORE_LOG_FILES = "scores-*.parquet"  # complete files: they are renamed into place whole


def score_log_files(path: pathlib.Path, pattern: str = SCORE_LOG_FILES) -> list[pathlib.Path]:
    """The files of the directory ``path`` that match ``pattern``, or ``path`` itself."""
    if path.is_file():
        return [path]
    return sorted(path.glob(pattern)) if path.is_dir() else []


def query_score_log(
    path: pathlib.Path | str, query: Callable[[pl.LazyFrame], pl.LazyFrame], pattern: str = SCORE_LOG_FILES
) -> pl.DataFrame | None:
    """``query`` over every file of the score log at ``path`` (a directory, a file or a URL; a
    directory's files those matching ``pattern``), collected; None when it has none.  Listed
    again when a file vanishes while read (the size budget); SampleError naming the first file
    that cannot be read otherwise."""
    if isinstance(path, str):
        if not is_url(path):
            path = pathlib.Path(path)
        else:
            try:
                frame: pl.DataFrame = query(scan_url(path)).collect()
                return frame
            except (pl.exceptions.PolarsError, OSError) as exc:
                if "expanded paths were empty" in str(exc) or "no such file" in str(exc).lower():
                    return None
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "unknown error"
                raise SampleError(
                    f"{path}: cannot read the score log ({first}); credentials and endpoint come from "
                    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and AWS_ENDPOINT_URL"
                ) from None
    for attempt in range(READ_TRIES):
        files = score_log_files(path, pattern)
        if not files:
            return None
        try:
            frame = query(scan_parquet_files(files, path)).collect()
            return frame
        except FileNotFoundError:
            if attempt + 1 == READ_TRIES:
                raise _unreadable(path, files, "files vanish as they are read") from None
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise _unreadable(path, files, str(exc)) from None
    raise AssertionError("unreachable")


def _unreadable(path: pathlib.Path, files: list[pathlib.Path], problem: str) -> SampleError:
    """The error for a score log that cannot be read, naming the first file that is no Parquet."""
    for f in files:
        try:
            pl.read_parquet_schema(f)
        except (pl.exceptions.PolarsError, OSError) as exc:
            path, problem = f, str(exc)
            break
    first = problem.strip().splitlines()[0][:300] if problem.strip() else "unknown error"
    return SampleError(
        f"{path}: cannot read the score log ({first}); move the unreadable file out of the directory "
        "(only `muse serve`'s own files belong there)"
    )


def read_frame(source: ScoreSource, column: str = "score") -> pl.DataFrame:
    """A DataFrame with at least ``column`` from an array, Series, DataFrame or file path."""
    if isinstance(source, pl.DataFrame):
        frame = source
    elif isinstance(source, pl.Series):
        frame = source.rename(column).to_frame()
    elif isinstance(source, np.ndarray):
        frame = pl.DataFrame({column: np.asarray(source, dtype=np.float64).reshape(-1)})
    else:
        frame = read_table(source)
    if column not in frame.columns:
        raise SampleError(f"score sample has no column {column!r} (columns: {', '.join(frame.columns)})")
    if not frame.schema[column].is_numeric():
        raise SampleError(f"column {column!r} is {frame.schema[column]}, not numeric")
    return frame


def read_scores(source: ScoreSource, column: str = "score") -> np.ndarray:
    scores: np.ndarray = read_frame(source, column)[column].cast(pl.Float64).to_numpy()
    return scores


@dataclass
class GroupFit:
    maps: dict[str, QuantileMap] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # group -> reason
    misses: dict[str, list[EdgeMiss]] = field(default_factory=dict)  # fitted group -> edges off by `warn_above`


def fit_per_group(
    source: ScoreSource,
    reference: Reference,
    by: str = "tenant",
    column: str = "score",
    min_samples: int = DEFAULT_MIN_SAMPLES,
    max_edge_error: float | None = None,
    warn_above: float | None = None,
) -> GroupFit:
    """One map per value of ``by`` (e.g. per tenant), in a single group-by pass.

    ``max_edge_error`` is passed to :func:`fit_quantile_map` (a group it refuses is skipped);
    with ``warn_above``, ``misses`` lists each fitted group's edges off by more than that."""
    frame = read_frame(source, column)
    if by not in frame.columns:
        raise SampleError(f"score sample has no column {by!r} to group by")
    grouped = frame.group_by(by).agg(pl.col(column).cast(pl.Float64).alias("scores")).sort(by)
    result = GroupFit()
    for key, scores in zip(grouped[by].to_list(), grouped["scores"].to_list()):
        name = str(key)
        result.sizes[name] = len(scores)
        sample = np.asarray(scores, dtype=np.float64)
        try:
            result.maps[name] = fit_quantile_map(sample, reference, min_samples, max_edge_error)
        except SampleError as exc:
            result.skipped[name] = str(exc)
            continue
        if warn_above is not None:
            misses = edge_misses(sample, result.maps[name], reference, warn_above)
            if misses:
                result.misses[name] = misses
    return result
