"""`muse usage`: rows per tenant from the score log (active only, within --since), and
requests, rows, bytes, quota refusals and latency from a running server's /metrics."""

from __future__ import annotations

import csv
import datetime
import io
import json
import time

import numpy as np
import polars as pl
import pytest
from helpers import make_registry, read_log

from muse.core.spec import DeploymentSpec, PredictorSpec, QuotaSpec, RouteSpec
from muse.server.auth import add_key, keys_path
from muse.server.cli import main as cli
from muse.server.scorelog import SCHEMA, ScoreLog
from muse.server.testing import LocalServer, deploy, wait_until

HOUR_US = 3600 * 10**6


def write_log(directory, rows: list[tuple[str, str, str, int, float]]) -> None:
    """(tenant, intent, role, rows, hours ago) appended to a score log in ``directory``, then flushed."""
    log = ScoreLog(directory)
    now = int(time.time() * 1e6)
    for tenant, intent, role, n, hours in rows:
        z = np.zeros(n)
        at = np.full(n, now - int(hours * HOUR_US), dtype=np.int64)
        log.append(tenant, intent, "p", "1", role, 1, z, z, z, at)
    assert log.flush()


LOG = [
    ("acme", "fraud", "active", 5, 0.5),
    ("acme", "fraud", "active", 3, 72),  # outside --since 1d
    ("acme", "fraud", "shadow", 7, 0.5),  # MUSE's work, not acme's
    ("globex", "fraud", "active", 2, 0.1),
    ("globex", "risk", "active", 4, 20),
    ("globex", "risk", "shadow", 4, 20),
    ("initech", "fraud", "active", 6, 30),  # only outside the window
]


def usage(capsys, *args: str) -> str:
    assert cli(["usage", *args]) == 0
    return capsys.readouterr().out


@pytest.fixture
def reg(tmp_path):
    root = tmp_path / "reg"
    write_log(root / "scorelog", LOG)
    return root


def test_table_counts_active_rows_in_the_window(reg, capsys):
    out = usage(capsys, "--registry", str(reg), "--since", "1d")
    lines = out.splitlines()
    assert lines[0].split() == ["tenant", "rows", "logged"]
    assert [line.split() for line in lines[1:3]] == [["acme", "5"], ["globex", "6"]]
    assert lines[4].split() == ["total", "11"]
    assert "initech" not in out and "shadow rows are not counted" in out
    assert "--score-log-sample 1" in out  # the sample caveat
    whole = usage(capsys, "--registry", str(reg), "--by", "intent").splitlines()
    assert [line.split() for line in whole[1:5]] == [
        ["acme", "fraud", "8"],
        ["globex", "fraud", "2"],
        ["globex", "risk", "4"],
        ["initech", "fraud", "6"],
    ]
    assert whole[6].split() == ["total", "20"]


def test_csv_and_json_are_machine_readable(reg, tmp_path, capsys):
    out = usage(capsys, "--registry", str(reg), "--since", "2h", "--by", "intent", "--format", "csv")
    assert list(csv.reader(io.StringIO(out))) == [
        ["tenant", "intent", "logged_rows"],
        ["acme", "fraud", "5"],
        ["globex", "fraud", "2"],
    ]
    # --scores names the directory; a shadow row of a tenant does not make it a tenant's row
    moved = tmp_path / "elsewhere"
    (reg / "scorelog").rename(moved)
    records = json.loads(usage(capsys, "--registry", str(reg), "--scores", str(moved), "--format", "json"))
    assert [(r["tenant"], r["logged_rows"]) for r in records] == [("acme", 8), ("globex", 6), ("initech", 6)]
    assert all("--score-log-sample 1" in r["logged_rows_note"] and r["logged_since"] is None for r in records)


def test_an_empty_window_or_log_says_so_and_exits_0(reg, tmp_path, capsys):
    out = usage(capsys, "--registry", str(reg), "--since", "90s")
    assert out.startswith("no scores logged in the last 90s in ") and "total" not in out
    assert cli(["usage", "--registry", str(reg), "--since", "90s", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and "no scores logged in the last 90s" in captured.err
    (tmp_path / "empty").mkdir()
    assert usage(capsys, "--registry", str(tmp_path / "empty"), "--format", "csv") == "tenant,logged_rows\n"


@pytest.mark.parametrize("since", ["15x", "1.5h", "0m", "-2h", "2 h", "2H", "h", "", "1d2h"])
def test_a_bad_since_is_a_one_line_error(reg, capsys, since):
    assert cli(["usage", "--registry", str(reg), f"--since={since}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("muse usage: error: --since ")
    assert "90s, 15m, 2h, 7d" in captured.err


def test_other_mistakes_are_one_line_errors(tmp_path, capsys):
    cases = [
        (["--registry", str(tmp_path / "nope")], "no such registry directory"),
        (["--registry", str(tmp_path), "--scores", str(tmp_path / "nope")], "--scores"),
        (["--registry", str(tmp_path), "--metrics-url", "localhost:9"], "not an http(s) URL"),
        (["--registry", str(tmp_path), "--key", "k"], "pass --metrics-url too"),
        (["--registry", str(tmp_path), "--scores", str(tmp_path / "log")], "scores-9-9-9.parquet: cannot read"),
    ]
    write_log(tmp_path / "log", LOG)
    (tmp_path / "log" / "scores-9-9-9.parquet").write_bytes(b"not parquet")
    for args, words in cases:
        assert cli(["usage", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


# -- a running server ------------------------------------------------------------------------

SPEC = DeploymentSpec(
    predictors=[PredictorSpec("p", "1", "fraud", ["lightgbm/1"])],
    routes=[RouteSpec("*", "fraud", "p")],
    quotas=[QuotaSpec("acme", rows_per_second=0.001, burst_rows=1)],  # one request, then refused
)


def test_metrics_of_a_running_server_per_tenant(tmp_path, lgb_case, capsys):
    reg = make_registry(tmp_path / "registry", {"lightgbm": lgb_case})
    deploy(reg, SPEC)
    keys = {t: add_key(keys_path(reg.root), t, False)[1] for t in ("acme", "globex")}
    admin = add_key(keys_path(reg.root), None, True)[1]
    reader = add_key(keys_path(reg.root), None, False, metrics=True)[1]
    with LocalServer(reg.root, "--metrics-auth", "--score-log-flush-seconds", "0.05") as server:
        server.wait_ready(generation=1)
        sent: dict[str, int] = {"acme": 0, "globex": 0}

        def score(tenant: str, rows: int, key: str) -> int:  # /v1/score
            body = {"tenant": tenant, "intent": "fraud", "events": [{"features": [0.5] * 6}] * rows}
            return server.post("/v1/score", body, key)[0]

        def infer(tenant: str, rows: int, key: str) -> int:  # /v2 (Open Inference Protocol)
            inputs = [{"name": "f", "shape": [rows, 6], "datatype": "FP64", "data": [0.5] * (6 * rows)}]
            body = json.dumps({"inputs": inputs}).encode()
            status = server.post("/v2/models/fraud/infer", body, key)[0]
            sent[tenant] += len(body) if status == 200 else 0
            return status

        assert score("acme", 5, keys["acme"]) == 200  # a bucket of 1 row: 5 go, in debt
        assert score("acme", 5, keys["acme"]) == 429  # refused by its key, before the rows are counted
        assert score("acme", 7, admin) == 429  # refused once its 7 rows are counted
        assert [infer("globex", n, keys["globex"]) for n in (2, 3, 4)] == [200] * 3
        wait_until(
            lambda: (read_log(reg.root / "scorelog")["role"] == "active").sum() == 14, 30, "the score log's 14 rows"
        )
        url = f"http://127.0.0.1:{server.port}"

        assert cli(["usage", "--registry", str(reg.root), "--metrics-url", url]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "answered 401" in err and "pass --key" in err, err
        assert cli(["usage", "--registry", str(reg.root), "--metrics-url", url, "--key", keys["acme"]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "answered 403" in err and "an admin or metrics key" in err, err

        args = ["--registry", str(reg.root), "--metrics-url", f"{url}/metrics", "--key", reader]
        records = json.loads(usage(capsys, *args, "--format", "json"))
        by_tenant = {r["tenant"]: r for r in records}
        assert list(by_tenant) == ["acme", "globex"], records
        acme, globex = by_tenant["acme"], by_tenant["globex"]
        expected = {
            "acme": (5, 1, 5, 2, 7),
            "globex": (9, 3, 9, 0, 0),
        }
        fields = ("logged_rows", "requests", "rows_scored", "quota_refused_requests", "quota_refused_rows")
        for tenant, values in expected.items():
            assert tuple(by_tenant[tenant][f] for f in fields) == values, by_tenant[tenant]
        assert globex["request_bytes"] == sent["globex"] and acme["request_bytes"] > 0
        assert all(0 < r["mean_latency_ms"] < 5000 for r in records)
        assert all(r["model_seconds"] > 0 for r in records), records  # both tenants had rows scored

        table = usage(capsys, *args).splitlines()
        header = "tenant  rows logged  requests  rows scored  request bytes  429s  rows refused  model s  mean ms"
        assert " ".join(table[0].split()) == " ".join(header.split())
        both = acme["request_bytes"] + globex["request_bytes"]
        assert table[4].split()[:7] == ["total", "14", "4", "14", f"{both:,}", "2", "7"], table
        assert any("since the server started" in line for line in table)

        # a tenant in either source: the score log of another directory, with only initech
        write_log(tmp_path / "other", [("initech", "fraud", "active", 6, 1)])
        out = usage(capsys, *args, "--scores", str(tmp_path / "other"), "--format", "csv")
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [(r["tenant"], r["logged_rows"], r["requests"], r["rows_scored"]) for r in rows] == [
            ("acme", "0", "1", "5"),
            ("globex", "0", "3", "9"),
            ("initech", "6", "0", "0"),
        ]
        assert rows[2]["mean_latency_ms"] == ""


def test_request_bytes_of_v1_score_are_the_bytes_received(tmp_path, lgb_case, capsys):
    reg = make_registry(tmp_path / "registry", {"lightgbm": lgb_case})
    deploy(reg, SPEC)
    with LocalServer(reg.root, "--no-auth", "--score-log-sample", "0") as server:
        server.wait_ready(generation=1)
        body = {"tenant": "globex", "intent": "fraud", "events": [{"features": [0.5] * 6}] * 20}
        assert server.post("/v1/score", body)[0] == 200
        url = f"http://127.0.0.1:{server.port}"
        (record,) = json.loads(usage(capsys, "--registry", str(reg.root), "--metrics-url", url, "--format", "json"))
    assert (record["tenant"], record["requests"], record["rows_scored"]) == ("globex", 1, 20)
    assert record["request_bytes"] == len(json.dumps(body).encode())


def test_a_log_with_files_from_before_event_ids_is_read_whole(tmp_path, capsys):
    """Files written before request_id/event_id existed, listed first, beside newer ones."""
    root = tmp_path / "reg"
    write_log(root / "scorelog", [("acme", "fraud", "active", 5, 0.5)])
    old = pl.DataFrame(
        {
            "time": [datetime.datetime.now(datetime.timezone.utc)] * 3,
            **{k: [v] * 3 for k, v in dict(tenant="globex", intent="fraud", predictor="p", version="1").items()},
            "role": ["active"] * 3,
            "generation": [1] * 3,
            **{k: [0.0] * 3 for k in ("margin", "corrected", "mapped")},
        }
    ).cast(SCHEMA)
    assert "event_id" not in old.columns
    old.write_parquet(root / "scorelog" / "scores-0-before-ids.parquet")
    assert sorted((root / "scorelog").glob("*.parquet"))[0].name == "scores-0-before-ids.parquet"
    lines = usage(capsys, "--registry", str(root)).splitlines()
    assert [line.split() for line in lines[1:3]] == [["acme", "5"], ["globex", "3"]]
