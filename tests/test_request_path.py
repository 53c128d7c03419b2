"""The request path's fast pieces against their plain equivalents: the native model
thread, the row conversion and the metric tallies."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from conftest import training_data
from muse.compile import NativeWorker, rows_matrix
from muse.core.batching import ModelBatcher, ModelThread
from muse.server.metrics import LATENCY_BUCKETS, _Tally


def test_model_thread_scores_like_predict(lgb_case):
    X, _ = training_data(rows=700, seed=4)
    model = lgb_case.model

    async def run():
        thread = ModelThread()
        try:
            parts = await asyncio.gather(*(thread.predict(model, X[i::5]) for i in range(5)))
        finally:
            thread.close()
        return parts

    parts = asyncio.run(run())
    for i, part in enumerate(parts):
        assert np.array_equal(part, model.predict(X[i::5], margin=True))


def test_batcher_scores_alone_and_in_bursts_alike(lgb_case):
    """Inline (lone request), handed off (alone, not inline) and coalesced (queued behind a call)."""
    X, _ = training_data(rows=64, seed=5)
    model = lgb_case.model
    want = model.predict(X, margin=True)

    async def run(inline_max_us):
        b = ModelBatcher(model, ModelThread(), inline_max_us=inline_max_us)
        b.seconds_per_row = 1e-6
        batches = []
        b.on_batch = lambda key, rows, waits: batches.append(rows)
        try:
            results = await asyncio.gather(*(b.submit(X[i:i + 1]) for i in range(len(X))))
        finally:
            b.thread.close()
        return np.concatenate([r.margins for r in results]), batches

    for inline_max_us in (0, 2000):
        got, batches = asyncio.run(run(inline_max_us))
        assert np.array_equal(got, want)
        assert sum(batches) == len(X) and max(batches) > 1  # the burst coalesced behind the first call


def test_worker_refuses_a_wrong_matrix(lgb_case):
    worker = NativeWorker()
    try:
        with pytest.raises(ValueError, match="C-contiguous"):
            worker.submit(lgb_case.model._lib, np.zeros((2, 3)), np.empty(2))
        with pytest.raises(ValueError, match="out must be"):
            worker.submit(lgb_case.model._lib, np.zeros((2, lgb_case.model.num_feature)), np.empty(3))
    finally:
        worker.close()


values = st.one_of(st.none(), st.floats(allow_nan=False), st.integers(-2**53, 2**53))


@given(st.lists(st.lists(values, min_size=3, max_size=3), max_size=5))
def test_rows_matrix_is_numpy_with_none_as_nan(rows):
    want = np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64).reshape(-1, 3)
    np.testing.assert_array_equal(rows_matrix(rows, 3), want)


def test_rows_matrix_refuses_bad_rows():
    with pytest.raises(ValueError, match="row 1 has 2 values, expected 3"):
        rows_matrix([[1.0, 2.0, 3.0], [1.0, 2.0]], 3)
    with pytest.raises(TypeError):
        rows_matrix([[1.0, "x", 3.0]], 3)


@settings(max_examples=50)
@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=40))
def test_tally_flush_equals_observe(observations):
    """A flushed tally exposes exactly what observing each value would have (this relies on
    prometheus_client's histogram storage, so a change there fails here)."""
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    h_direct = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=direct)
    tally = _Tally(Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=tallied), LATENCY_BUCKETS)
    for v in observations:
        h_direct.observe(v)
        tally.observe(v)
    tally.flush()
    tally.flush()  # a second flush adds nothing

    def samples(registry):
        return [line for line in generate_latest(registry).decode().splitlines()
                if line and not line.startswith("#") and "_created" not in line]

    want, got = samples(direct), samples(tallied)
    assert [line.split()[0] for line in got] == [line.split()[0] for line in want]
    for g, w in zip(got, want):
        assert float(g.split()[1]) == pytest.approx(float(w.split()[1]), rel=1e-12, abs=1e-12)
