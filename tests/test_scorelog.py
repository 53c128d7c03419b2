"""The score log's buffers, files and disk budget."""
from __future__ import annotations

import numpy as np
import polars as pl

from muse.server.scorelog import ScoreLog


def test_rows_survive_buffer_boundaries_in_order(tmp_path):
    log = ScoreLog(tmp_path, rows_per_file=5)
    log.warm()  # as the server does at start-up: nothing on disk, nothing added to the log
    assert not log.due and not list(tmp_path.iterdir())
    expected = []
    for i, n in enumerate([1, 3, 4, 1, 7, 2]):
        margins = np.arange(n, dtype=float) + 100 * i
        log.record(f"t{i % 2}", "fraud", "p", "1", "active" if i else "shadow", i, margins, margins / 2, margins / 4)
        expected += [(f"t{i % 2}", i, m) for m in margins]
    assert log.due  # full buffers are waiting
    files = log.flush()
    assert len(files) == 4 and log.flush() == []
    frame = pl.concat([pl.read_parquet(f) for f in files])
    assert list(zip(frame["tenant"], frame["generation"], frame["margin"])) == expected
    np.testing.assert_array_equal(frame["mapped"].to_numpy(), frame["margin"].to_numpy() / 4)
    assert frame["role"][0] == "shadow" and set(frame["role"][1:]) == {"active"}
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_disk_budget_removes_oldest_files(tmp_path):
    log = ScoreLog(tmp_path, rows_per_file=1000, max_bytes=1)
    for i in range(3):
        log.record("t", "fraud", "p", "1", "active", i, np.ones(10), np.ones(10), np.ones(10))
        log.flush()
    files = sorted(tmp_path.glob("scores-*.parquet"))
    assert len(files) == 1 and pl.read_parquet(files[0])["generation"].to_list() == [2] * 10


def test_sampling_is_per_request(tmp_path):
    log = ScoreLog(tmp_path, sample=0.0)
    log.record("t", "fraud", "p", "1", "active", 1, np.ones(3), np.ones(3), np.ones(3))
    assert log.flush() == []
    log = ScoreLog(tmp_path / "half", sample=0.5)
    for _ in range(400):
        log.record("t", "fraud", "p", "1", "active", 1, np.ones(2), np.ones(2), np.ones(2))
    rows = pl.read_parquet(log.flush()[0]).height
    assert rows % 2 == 0 and 300 < rows < 500  # whole requests, about half of them
