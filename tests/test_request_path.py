"""The request path's pieces: the native model thread and its calibration, the row
conversion and histograms filled in bulk (against their plain equivalents), the
route table and the adapter from msgspec's errors to field paths."""

from __future__ import annotations

import asyncio
import json

import msgspec
import numpy as np
import pytest
from conftest import training_data
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from muse.calib import MapTable, QuantileMap, identity_map
from muse.compile import ModelThread, NativeWorker, native_map_table
from muse.core.batching import ModelBatcher
from muse.server import api_inference, openapi
from muse.server._rows import rows_matrix
from muse.server.app import ROUTES
from muse.server.errors import HTTPError, validation_error
from muse.server.metrics import LATENCY_BUCKETS, add_to_histogram


def _tables() -> tuple[MapTable, MapTable]:
    """Two map tables of the shape a snapshot builds: the identity first, then fitted-like maps."""
    bent = QuantileMap([0.0, 0.01, 0.05, 0.3, 1.0], [0.0, 0.4, 0.8, 0.95, 1.0])
    steep = QuantileMap([0.0, 0.2, 1.0], [0.0, 0.9, 1.0])
    return MapTable([identity_map(), bent, steep]), MapTable([identity_map(), steep])


def _expected(model, X, table: MapTable, index) -> np.ndarray:
    margins = model.predict(X, margin=True)
    m = model.manifest
    return np.stack([margins, *table.calibrate(margins, index, m.beta, m.margin_kind)])


def test_model_thread_scores_and_calibrates_like_predict(lgb_case):
    """Margins with corrected and mapped scores computed in the same native call (one map for
    all rows, one map per row; concurrent calls), against predict and the Numba kernel."""
    X, _ = training_data(rows=700, seed=4)
    model = lgb_case.model
    table = _tables()[0]
    native = native_map_table(table)
    per_row = np.arange(len(X), dtype=np.int64) % len(table)

    async def run():
        thread = ModelThread()
        try:
            parts = await asyncio.gather(*(thread.score_async(model, X[i::5], native, 0) for i in range(5)))
            one_map = await thread.score_async(model, X, native, 1)
            each_row = await thread.score_async(model, X, native, per_row)
        finally:
            thread.close()
        return parts, one_map, each_row

    parts, one_map, each_row = asyncio.run(run())
    for i, part in enumerate(parts):
        assert np.array_equal(part.margin, model.predict(X[i::5], margin=True))
        np.testing.assert_allclose(part.array, _expected(model, X[i::5], table, 0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(one_map.array, _expected(model, X, table, 1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(each_row.array, _expected(model, X, table, per_row), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(model.score(X, native, per_row).array, each_row.array)
    assert np.array_equal(each_row.mapped, each_row.array[2]) and np.array_equal(each_row.corrected, each_row.array[1])


def test_batcher_scores_alone_and_in_bursts_alike(lgb_case):
    """Inline (lone request), handed off (alone, not inline) and coalesced (queued behind a call),
    with tenants of different maps and a second table (a deployment swap) in one burst: each
    request gets what scoring it alone gives, and no batch mixes tables."""
    X, _ = training_data(rows=64, seed=5)
    model = lgb_case.model
    tables = _tables()
    natives = [native_map_table(t) for t in tables]
    tables_of = [k % 2 if k < 40 else 1 for k in range(len(X))]
    plan = [(t, k % len(tables[t])) for k, t in enumerate(tables_of)]  # (table, map)

    async def run(inline_max_us):
        b = ModelBatcher(model, ModelThread(), inline_max_us=inline_max_us)
        b.seconds_per_row = 1e-6
        inline = []
        score_here = b._score_here
        b._score_here = lambda *args: inline.append(1) or score_here(*args)
        try:
            results = await asyncio.gather(
                *(b.score_async(X[k : k + 1], natives[t], m, "acme") for k, (t, m) in enumerate(plan))
            )
            calibrated_batches, waits = b.stats.take()
            identity = await asyncio.gather(
                *(b.score_async(X[k : k + 1], natives[0], 0, "acme") for k in range(len(X)))
            )
        finally:
            b.thread.close()
        return results, identity, calibrated_batches, waits, b.stats.rows, len(inline)

    for inline_max_us in (0, 2000):
        results, identity, batches, waits, margin_batches, inline = asyncio.run(run(inline_max_us))
        assert (inline > 0) == (inline_max_us > 0)  # the burst's first calls, before it looks busy
        for k, (t, m) in enumerate(plan):
            np.testing.assert_allclose(
                results[k].array, _expected(model, X[k : k + 1], tables[t], m), rtol=1e-12, atol=1e-15
            )
        assert np.array_equal(np.concatenate([s.margin for s in identity]), model.predict(X, margin=True))
        assert sum(batches) == sum(margin_batches) == len(X) and len(waits) == len(X)  # each call, each request
        assert max(batches) > 1 and max(margin_batches) > 1  # bursts coalesced behind the first call
        # Tables alternate in the first 40 requests: the batches holding them are cut at every change.
        first = np.cumsum(batches) <= 39
        assert set(np.array(batches)[first]) == {1} and max(np.array(batches)[~first]) > 1


def test_worker_refuses_a_wrong_call(lgb_case):
    model = lgb_case.model
    lib, width = model._lib, model.num_feature
    native = native_map_table(_tables()[1])
    X = np.zeros((2, width))
    worker = NativeWorker()
    try:
        with pytest.raises(ValueError, match="C-contiguous"):
            worker.submit(lib, np.zeros((2, 3)), np.empty(2))
        with pytest.raises(ValueError, match="out must be"):
            worker.submit(lib, X, np.empty(3))
        with pytest.raises(ValueError, match="out must be"):
            worker.submit(lib, X, np.empty(2), True, native)  # calibrating needs [3, rows]
        with pytest.raises(IndexError, match=r"in \[0, 2\), got 2"):
            worker.submit(lib, X, np.empty((3, 2)), True, native, 1, 0.0, 2)
        with pytest.raises(ValueError, match="map_index"):
            worker.submit(lib, X, np.empty((3, 2)), True, native, 1, 0.0, np.zeros(2, dtype=np.int32))
    finally:
        worker.close()
    with pytest.raises(IndexError, match="row 1: map index out of range"):  # checked in the kernel
        model.score(X, native, np.array([1, 7], dtype=np.int64))


values = st.one_of(st.none(), st.floats(allow_nan=False), st.integers(-(2**53), 2**53))


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
@given(
    st.lists(
        st.one_of(st.floats(min_value=0, max_value=10, allow_nan=False), st.sampled_from(LATENCY_BUCKETS)), max_size=40
    )
)  # bounds themselves too: a value on a bound counts in its bucket
def test_histogram_in_bulk_equals_observe(observations):
    """Values added in bulk expose exactly what observing each would have (this relies on
    prometheus_client's histogram storage, so a change there fails here)."""
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    h_direct = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=direct)
    h_bulk = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=tallied)
    for v in observations:
        h_direct.observe(v)
    add_to_histogram(h_bulk, LATENCY_BUCKETS, observations)
    add_to_histogram(h_bulk, LATENCY_BUCKETS, [])  # adding nothing changes nothing

    def samples(registry):
        return [
            line
            for line in generate_latest(registry).decode().splitlines()
            if line and not line.startswith("#") and "_created" not in line
        ]

    want, got = samples(direct), samples(tallied)
    assert [line.split()[0] for line in got] == [line.split()[0] for line in want]
    for g, w in zip(got, want):
        assert float(g.split()[1]) == pytest.approx(float(w.split()[1]), rel=1e-12, abs=1e-12)


class _Nested(msgspec.Struct):
    value: float
    label: str


class _Doc(msgspec.Struct):
    items: list[_Nested]
    name: str


@given(st.integers(0, 5), st.sampled_from(["value", "label"]), st.booleans())
def test_validation_errors_name_the_field(index, field, missing):
    """The one adapter from msgspec's message to a field path: a wrong type at items[i].field, or
    the field missing there, comes back as exactly that path."""
    items: list[dict] = [{"value": 1.0, "label": "x"} for _ in range(index + 1)]
    if missing:
        del items[index][field]
    else:
        items[index][field] = [] if field == "value" else 3
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(msgspec.json.encode({"items": items, "name": "n"}), type=_Doc)
    error = validation_error(caught.value)
    assert (error.status, error.field) == (422, f"$.items[{index}].{field}")


def test_malformed_json_is_400_at_the_root():
    with pytest.raises(msgspec.DecodeError) as caught:
        msgspec.json.decode(b'{"items": [', type=_Doc)
    error = validation_error(caught.value)
    assert (error.status, error.field) == (400, "$") and error.message.startswith("malformed JSON")


def test_route_table_dispatches_templates_and_refuses_other_methods():
    endpoint, params = ROUTES.match("POST", "/v2/models/fraud/versions/3/infer")
    assert endpoint.handler is api_inference.infer and params == {"intent": "fraud", "version": "3"}
    assert ROUTES.match("HEAD", "/v2/health/ready")[0].path == "/v2/health/ready"  # HEAD is GET's
    with pytest.raises(HTTPError) as caught:
        ROUTES.match("DELETE", "/v2/models/fraud")
    assert caught.value.status == 405 and dict(caught.value.headers)[b"allow"] == b"GET, HEAD"
    with pytest.raises(HTTPError) as caught:
        ROUTES.match("GET", "/v2/models/fraud/explain")
    assert caught.value.status == 404
    # Every endpoint dispatched is in the OpenAPI document, and nothing else.
    paths = json.loads(openapi.document(ROUTES, "test"))["paths"]
    assert {(m.upper(), p) for p, ops in paths.items() for m in ops} == {(e.method, e.path) for e in ROUTES.endpoints}
