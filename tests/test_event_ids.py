"""Event ids and request ids (issue 16): every score-log row carries the request's id (the
access log's) and its event's id -- the client's, or the one the server generated and
answered with -- active and shadow rows alike; score-log directories written before these
columns existed read beside new files."""

from __future__ import annotations

import datetime
import pathlib
import re
import tempfile

import numpy as np
import polars as pl
import pytest
from helpers import make_registry, read_log
from hypothesis import given, settings
from hypothesis import strategies as st

from muse.calib.names import MAX_EVENT_ID_CHARS
from muse.calib.samples import read_table
from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec
from muse.server.scorelog import FILE_SCHEMA, SCHEMA, ScoreLog, _Buffer
from muse.server.testing import LocalServer, deploy, wait_until

T0 = 1_700_000_000_000_000  # microseconds since the epoch
HEX16 = re.compile(r"^[0-9a-f]{16}$")

# -- the log alone -------------------------------------------------------------------------

request_ids = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8)
client_id = st.one_of(st.none(), st.text(max_size=6), st.integers(min_value=-(2**200), max_value=2**200))


@st.composite
def logged_request(draw):
    """(request id, prefix or None, client ids or None, rows) as serving logs a request."""
    rows = draw(st.integers(1, 5))
    ids = draw(st.one_of(st.none(), st.lists(client_id, min_size=rows, max_size=rows)))
    return draw(request_ids), draw(st.one_of(st.none(), request_ids)), ids, rows


def expected_ids(requests) -> list[tuple[str, str]]:
    """(request_id, event_id) of each row: the client's id as a string, else <prefix>-<row>."""
    out = []
    for request_id, prefix, ids, rows in requests:
        for i in range(rows):
            given_id = None if ids is None else ids[i]
            out.append((request_id, f"{prefix or request_id}-{i}" if given_id is None else str(given_id)))
    return out


def ids_of(frame: pl.DataFrame) -> list[tuple[str, str]]:
    return list(zip(frame["request_id"].to_list(), frame["event_id"].to_list()))


@settings(max_examples=40, deadline=None)  # each example writes Parquet files: ~0.1 s
@given(
    st.lists(st.lists(logged_request(), min_size=1, max_size=6), min_size=1, max_size=5),
    st.integers(1, 7),
    st.integers(0, 30),
)
def test_ids_survive_buffers_retries_and_files(appends, rows_per_file, keep):
    """Requests appended in groups (one group per series per record), split across buffers of
    any size, joined for a retry (the newest ``keep`` rows) and written: each row keeps its
    request's ids and its own index in the request."""
    requests = [r for group in appends for r in group]
    expected = expected_ids(requests)
    with tempfile.TemporaryDirectory() as tmp:
        log = ScoreLog(tmp, rows_per_file=rows_per_file, flush_seconds=3600)
        for group in appends:
            sizes = [rows for *_, rows in group]
            m = np.arange(sum(sizes), dtype=float)
            at = np.full(len(m), T0, dtype=np.int64)
            log.append("t", "fraud", "p", "1", "active", 1, m, m, m, at, [r[:3] for r in group], sizes)
        buffers = [b for b in [*log._full, log._buffer] if b.rows]
        joined = _Buffer.join([(b, b.rows) for b in buffers])
        assert ids_of(joined.frame(log._labels)) == expected
        log.max_pending_rows = keep  # a failing disk keeps the newest rows, in buffers joined anew
        kept = [row for b in log._bounded(buffers, "disk_full") for row in ids_of(b.frame(log._labels))]
        assert kept == expected[max(len(expected) - keep, 0) :]
        log.flush()
        frame = read_log(pathlib.Path(tmp))
    assert frame.schema == FILE_SCHEMA
    assert ids_of(frame) == expected


def test_rows_appended_without_ids_have_null_ids(tmp_path):
    log = ScoreLog(tmp_path)
    m = np.zeros(3)
    log.append("t", "fraud", "p", "1", "active", 1, m, m, m, np.full(3, T0, dtype=np.int64))
    log.flush()
    frame = read_log(tmp_path)
    assert frame["request_id"].null_count() == frame["event_id"].null_count() == 3


def old_file(directory: pathlib.Path, name: str, tenant: str) -> None:
    """A score-log file as written before event ids: SCHEMA's columns only."""
    at = datetime.datetime.fromtimestamp(T0 / 1e6, datetime.timezone.utc)
    pl.DataFrame(
        {
            "time": [at, at],
            "tenant": [tenant] * 2,
            "intent": ["fraud"] * 2,
            "predictor": ["p"] * 2,
            "version": ["1"] * 2,
            "role": ["active"] * 2,
            "generation": [1, 1],
            "margin": [0.0, 1.0],
            "corrected": [0.0, 0.5],
            "mapped": [0.1, 0.2],
        }
    ).cast(SCHEMA).write_parquet(directory / name)


@pytest.mark.parametrize("old_first", [True, False])
def test_old_and_new_files_read_together(tmp_path, old_first):
    """An upgraded server's directory: files without the id columns beside files with them,
    whichever sorts first (by name, i.e. by time: the old ones, in practice)."""
    old_file(
        tmp_path,
        "scores-0000000000000-1-000001.parquet" if old_first else "scores-9999999999999-1-000001.parquet",
        "old",
    )
    log = ScoreLog(tmp_path)
    m = np.array([0.3, 0.4, 0.5])
    log.append(
        "new",
        "fraud",
        "p",
        "1",
        "active",
        1,
        m,
        m,
        m,
        np.full(3, T0, dtype=np.int64),
        [("r1", None, ["a", None, 5])],
        [3],
    )
    log.flush()
    frame = read_table(tmp_path)
    assert frame.schema == FILE_SCHEMA
    assert frame.height == 5
    old, new = frame.filter(pl.col("tenant") == "old"), frame.filter(pl.col("tenant") == "new")
    assert old["request_id"].to_list() == old["event_id"].to_list() == [None, None]
    assert ids_of(new) == [("r1", "a"), ("r1", "r1-1"), ("r1", "5")]
    assert frame["mapped"].sort().to_list() == [0.1, 0.2, 0.3, 0.4, 0.5]


# -- a running server ----------------------------------------------------------------------

SPEC = DeploymentSpec(
    predictors=[
        PredictorSpec("live", "1", "fraud", ["lightgbm/1"]),
        PredictorSpec("candidate", "1", "fraud", ["lightgbm/1"]),
    ],
    routes=[RouteSpec("*", "fraud", "live", shadows=["candidate"])],
)


@pytest.fixture(scope="module")
def served(tmp_path_factory, lgb_case):
    reg = make_registry(tmp_path_factory.mktemp("event-ids") / "registry", {"lightgbm": lgb_case})
    deploy(reg, SPEC)
    with LocalServer(reg.root, "--no-auth", "--score-log-flush-seconds", "0.05") as server:
        server.wait_ready(generation=1)
        yield server, reg.root / "scorelog"


def score(server, events: list[dict], request_id: str | None = None) -> dict:
    headers = {"X-Request-ID": request_id} if request_id else {}
    status, body, _ = server.post("/v1/score", {"tenant": "acme", "intent": "fraud", "events": events}, headers=headers)
    assert status == 200, body
    return body


def infer(server, rows: int, oip_id: str | int | None = None, request_id: str | None = None) -> tuple[int, dict]:
    payload: dict = {"inputs": [{"name": "f", "shape": [rows, 6], "datatype": "FP64", "data": [0.5] * (6 * rows)}]}
    payload["parameters"] = {"tenant": "acme"}
    if oip_id is not None:
        payload["id"] = oip_id
    headers = {"X-Request-ID": request_id} if request_id else {}
    status, body, _ = server.post("/v2/models/fraud/infer", payload, headers=headers)
    return status, body


def logged(directory: pathlib.Path, request_id: str, rows: int) -> dict[str, list[tuple[str, str]]]:
    """{role: [(request_id, event_id), ...] in row order} of one request, once both its active
    and its shadow rows are on disk."""

    def both() -> dict | None:
        if not list(directory.glob("scores-*.parquet")):
            return None
        frame = read_table(directory).filter(pl.col("request_id") == request_id)
        by_role = {role: ids_of(frame.filter(pl.col("role") == role)) for role in ("active", "shadow")}
        return by_role if all(len(ids) == rows for ids in by_role.values()) else None

    return wait_until(both, 30, f"the active and shadow rows of request {request_id} in the score log")


def test_client_ids_are_logged_for_active_and_shadow_rows(served):
    server, directory = served
    body = score(server, [{"id": "tx-1", "features": [0.1] * 6}, {"id": 42, "features": [0.2] * 6}], "req-client")
    assert body["ids"] == ["tx-1", 42]  # echoed as sent
    rows = logged(directory, "req-client", 2)
    assert rows["active"] == rows["shadow"] == [("req-client", "tx-1"), ("req-client", "42")]


@pytest.mark.parametrize("events", [1, 3])
def test_generated_ids_are_answered_and_logged(served, events):
    """No event has an id: the answer carries <request id>-<i>, the request id being a new one
    (16 hex digits) when the client sent no X-Request-ID."""
    server, directory = served
    body = score(server, [{"features": [0.3] * 6}] * events)
    request_id = body["ids"][0].rsplit("-", 1)[0]
    assert HEX16.match(request_id), body
    assert body["ids"] == [f"{request_id}-{i}" for i in range(events)]
    rows = logged(directory, request_id, events)
    assert rows["active"] == rows["shadow"] == [(request_id, i) for i in body["ids"]]


def test_mixed_ids_are_generated_where_missing(served):
    server, directory = served
    events = [{"id": "a", "features": [0.1] * 6}, {"features": [0.2] * 6}, {"id": 7, "features": [0.3] * 6}]
    body = score(server, events, 'mixed"\\req')  # a quote and a backslash: JSON-escaped in the answer
    assert body["ids"] == ["a", 'mixed"\\req-1', 7]
    rows = logged(directory, 'mixed"\\req', 3)
    assert rows["active"] == rows["shadow"] == [('mixed"\\req', e) for e in ("a", 'mixed"\\req-1', "7")]


def test_inference_protocol_ids(served):
    """The protocol's request id names the rows (<id>-<row>); the log's request_id is the access
    log's; without an id the answer carries the one generated."""
    server, directory = served
    status, body = infer(server, 2, oip_id="batch-9", request_id="req-oip")
    assert status == 200 and body["id"] == "batch-9", body
    rows = logged(directory, "req-oip", 2)
    assert rows["active"] == rows["shadow"] == [("req-oip", "batch-9-0"), ("req-oip", "batch-9-1")]

    status, body = infer(server, 3)
    assert status == 200 and HEX16.match(body["id"]), body
    rows = logged(directory, body["id"], 3)
    assert rows["active"] == rows["shadow"] == [(body["id"], f"{body['id']}-{i}") for i in range(3)]


@pytest.mark.parametrize("odd", ["", "has space", "x" * 129, "naïve", "tab\there"])
def test_an_inference_id_that_cannot_prefix_event_ids_is_echoed_and_rows_take_the_request_id(served, odd):
    """The protocol allows any string id and asks for it back; the rows are named after the
    server's request id, which the answer gives as parameters.event_id_prefix."""
    server, directory = served
    status, body = infer(server, 2, oip_id=odd, request_id=f"req-odd-{len(odd)}-{odd.isascii()}")
    assert status == 200 and body["id"] == odd, body
    prefix = body["parameters"]["event_id_prefix"]
    assert prefix == f"req-odd-{len(odd)}-{odd.isascii()}"
    rows = logged(directory, prefix, 2)
    assert rows["active"] == [(prefix, f"{prefix}-0"), (prefix, f"{prefix}-1")]


@pytest.mark.parametrize("bad", [5, "x" * (MAX_EVENT_ID_CHARS + 1)])
def test_inference_protocol_refuses_an_id_that_is_no_bounded_string(served, bad):
    server, _ = served
    status, body = infer(server, 1, oip_id=bad)
    assert status == 422 and body["field"] == "$.id", body


@pytest.mark.parametrize("bad", ["", "x" * (MAX_EVENT_ID_CHARS + 1), "tab\there", "zero\u200bwidth", 10**30])
def test_an_event_id_that_labels_could_not_name_is_refused(served, bad):
    """Empty, or longer than `muse labels import` accepts: 422 naming the event's id."""
    server, _ = served
    events = [{"id": "ok", "features": [0.1] * 6}, {"id": bad, "features": [0.1] * 6}]
    status, body, _ = server.post("/v1/score", {"tenant": "acme", "intent": "fraud", "events": events})
    assert status == 422 and body["field"] == "$.events[1].id", body
    assert score(server, [{"id": "y" * MAX_EVENT_ID_CHARS, "features": [0.1] * 6}])["ids"] == ["y" * MAX_EVENT_ID_CHARS]


def test_read_table_reads_every_parquet_file_of_a_directory_not_only_a_score_logs(tmp_path):
    """A directory given to `muse calib fit --scores` (read_table) is read whole, whatever its
    files are named; a score log's own reader keeps to its complete scores-*.parquet files."""
    from muse.calib.samples import query_score_log

    pl.DataFrame({"corrected": [0.1, 0.2]}).write_parquet(tmp_path / "part-0.parquet")
    pl.DataFrame({"corrected": [0.3]}).write_parquet(tmp_path / "scores-1-h-1-000001.parquet")
    assert sorted(read_table(tmp_path)["corrected"].to_list()) == [0.1, 0.2, 0.3]
    log = query_score_log(tmp_path, lambda f: f)
    assert log is not None and log["corrected"].to_list() == [0.3]
