"""The score log as serving writes it: ``append`` (from Serving.record_served) and ``flush``;
buffers, file rotation, the disk budget and sampling, read back with Polars."""

from __future__ import annotations

import asyncio
import datetime
import json

import numpy as np
import polars as pl
import pytest
from conftest import get_case
from helpers import calibrate, make_registry, read_log, rows

from muse.server.scorelog import ScoreLog
from muse.server.testing import as_json_rows, wait_until

T0 = 1_700_000_000_000_000  # microseconds since the epoch


def append(
    log: ScoreLog,
    n: int,
    generation: int = 1,
    tenant: str = "t",
    role: str = "active",
    at_us: int = T0,
    margins: np.ndarray | None = None,
) -> np.ndarray:
    """One request's ``n`` rows as serving appends them: margins, corrected (margins / 2), mapped (/ 4)."""
    m = np.arange(n, dtype=float) if margins is None else margins
    log.append(tenant, "fraud", "p", "1", role, generation, m, m / 2, m / 4, np.full(n, at_us, dtype=np.int64))
    return m


def test_rows_survive_buffer_boundaries_in_order(tmp_path):
    log = ScoreLog(tmp_path, rows_per_file=5, flush_seconds=3600)
    log.warm()  # as the server does at start-up: nothing on disk, nothing added to the log
    assert not log.due and not list(tmp_path.iterdir())
    expected = []
    for i, n in enumerate([1, 3, 4, 1, 7, 2]):
        at = T0 + i * 1000
        margins = append(
            log,
            n,
            generation=i,
            tenant=f"t{i % 2}",
            role="active" if i else "shadow",
            at_us=at,
            margins=np.arange(n, dtype=float) + 100 * i,
        )
        expected += [(f"t{i % 2}", i, m, at) for m in margins]
    assert log.due  # full buffers are waiting, though no flush interval has passed
    files = log.flush()
    assert [pl.read_parquet(f).height for f in files] == [5, 5, 5, 3] and log.flush() == []
    assert not log.due
    frame = read_log(tmp_path)
    assert frame.schema == pl.Schema(pl.read_parquet(files[0]).schema)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    micros = [(t - epoch) // datetime.timedelta(microseconds=1) for t in frame["time"]]
    assert list(zip(frame["tenant"], frame["generation"], frame["margin"], micros)) == expected
    np.testing.assert_array_equal(frame["corrected"].to_numpy(), frame["margin"].to_numpy() / 2)
    np.testing.assert_array_equal(frame["mapped"].to_numpy(), frame["margin"].to_numpy() / 4)
    assert frame["role"][0] == "shadow" and set(frame["role"][1:]) == {"active"}
    assert set(frame["intent"]) == {"fraud"} and set(frame["predictor"]) == {"p"} and set(frame["version"]) == {"1"}
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_partial_buffer_is_due_after_flush_seconds(tmp_path):
    log = ScoreLog(tmp_path, rows_per_file=100, flush_seconds=0.05)
    assert not log.due  # nothing to write, however long it waits
    append(log, 3)
    wait_until(lambda: log.due, 5, "3 buffered rows to be due after flush_seconds")
    (path,) = log.flush()
    assert pl.read_parquet(path)["margin"].to_list() == [0.0, 1.0, 2.0] and not log.due


def test_disk_budget_removes_oldest_files(tmp_path):
    log = ScoreLog(tmp_path, rows_per_file=1000, max_bytes=1)
    for i in range(3):
        append(log, 10, generation=i)
        log.flush()
    files = sorted(tmp_path.glob("scores-*.parquet"))
    assert len(files) == 1 and pl.read_parquet(files[0])["generation"].to_list() == [2] * 10  # the newest stays

    roomy = ScoreLog(tmp_path / "roomy", rows_per_file=1000, max_bytes=1 << 20)
    for i in range(3):
        append(roomy, 10, generation=i)
        roomy.flush()
    assert read_log(tmp_path / "roomy")["generation"].to_list() == [0] * 10 + [1] * 10 + [2] * 10


def test_sampling_is_per_request(tmp_path):
    assert ScoreLog(tmp_path / "all", sample=1.0).sampled()
    never = ScoreLog(tmp_path / "none", sample=0.0)
    assert not any(never.sampled() for _ in range(1000))
    half = ScoreLog(tmp_path / "half", sample=0.5)
    kept = sum(half.sampled() for _ in range(2000))
    assert 850 < kept < 1150  # binomial(2000, 0.5): 6.7 standard deviations either side


@pytest.fixture(scope="module")
def reg(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("scorelog")
    reg = make_registry(root / "registry", {"lightgbm": get_case("lightgbm", model_dir, root / "compiled")})
    calibrate(reg, "lightgbm", {})
    return reg


@pytest.mark.parametrize("sample", [0.0, 0.5])
def test_served_requests_are_sampled_whole_through_the_app(reg, tmp_path, sample):
    """Serving samples per request (Serving's series ask the log's ``sampled``) and appends every
    row of a kept request; a log sampling nothing writes no file."""
    from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec
    from muse.server.app import MuseApp
    from muse.server.settings import Settings
    from muse.server.testing import ASGIClient, deploy

    deploy(
        reg,
        DeploymentSpec(
            predictors=[PredictorSpec("a", "1", "fraud", ["lightgbm/1"], "lightgbm/1")],
            routes=[RouteSpec("*", "fraud", "a")],
        ),
    )
    sizes = [1 + i % 4 for i in range(200)]

    async def run():
        app = MuseApp(
            Settings(
                registry=str(reg.root), auth=False, poll_interval=3600, score_log=str(tmp_path), score_log_sample=sample
            )
        )
        served = []
        async with ASGIClient(app) as client:
            for i, n in enumerate(sizes):
                body = {
                    "tenant": "acme",
                    "intent": "fraud",
                    "events": [{"features": r} for r in as_json_rows(rows(n, seed=i))],
                }
                status, raw, _ = await client.request("POST", "/v1/score", json.dumps(body).encode())
                assert status == 200, raw
                served.append(json.loads(raw)["scores"])
                if i % 50 == 49:
                    app.serving.record_served()
        return served  # the log is flushed at shut-down

    served = asyncio.run(run())
    logged = read_log(tmp_path)
    if sample == 0.0:
        assert logged.height == 0 and not list(tmp_path.glob("*.parquet"))
        return
    # A request's rows share one time (taken when it was served): the log, grouped by time, must be
    # whole served requests, in the order served.
    groups = logged.group_by("time", maintain_order=True).agg(pl.col("mapped"))["mapped"].to_list()
    assert sum(len(g) for g in groups) == logged.height
    at = 0
    for group in groups:
        while at < len(served) and served[at] != group:
            at += 1
        assert at < len(served), f"logged rows {group} are not a whole served request (in order)"
        at += 1
    assert 50 < len(groups) < 150  # binomial(200, 0.5): 7 standard deviations either side
    # ... each under its own request id, its events numbered in order (the client sent no ids)
    requests = logged.group_by("request_id", maintain_order=True).agg(pl.col("event_id"))
    assert requests.height == len(groups)
    for request_id, events in requests.iter_rows():
        assert events == [f"{request_id}-{i}" for i in range(len(events))]
