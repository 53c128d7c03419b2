"""Fair batching (issue 15): a model's queued rows wait per tenant, batches are drawn across the
tenants by weighted deficit round robin over rows, a large request is cut into chunks of at most
``max_rows`` at batch boundaries, and each tenant's queue has its own bound.

Driven in-process on an asyncio loop.  Most tests use a stand-in for the native model thread that
records each call and answers it only when the test releases it, so what arrives while each call
is in flight is the test's choice and nothing depends on timing; it scores with the real model,
or echoes its rows (a row's tenant and serial number come back as its margin and corrected score,
its map index as its mapped score) where the tests count rows rather than check scores."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from itertools import pairwise

import numpy as np
import pytest
from conftest import FEATURES, training_data
from hypothesis import given, settings
from hypothesis import strategies as st

from muse.calib import MapTable, QuantileMap, identity_map
from muse.compile import ModelThread, Scores, native_map_table
from muse.core import batching
from muse.core.batching import MIN_CALL_ROWS, QUEUE_SHARES, ModelBatcher, Overloaded
from muse.core.predictor import Predictor

MARK = 1234.5  # a value no training row holds: marks the late tenant's row


def _table() -> MapTable:
    bent = QuantileMap([0.0, 0.01, 0.05, 0.3, 1.0], [0.0, 0.4, 0.8, 0.95, 1.0])
    steep = QuantileMap([0.0, 0.2, 1.0], [0.0, 0.9, 1.0])
    return MapTable([identity_map(), bent, steep])


def echo(X: np.ndarray, maps, map_index) -> Scores:
    """A call's answer that says which rows it was given, in which order, with which map."""
    index = np.broadcast_to(np.asarray(map_index, dtype=np.float64), (len(X),))
    return Scores(np.stack([X[:, 0], X[:, 1], index]))


def tagged(tenant: int, start: int, rows: int) -> np.ndarray:
    """Rows of ``tenant`` numbered start, start + 1, ... (columns 0 and 1; the rest zeros)."""
    X = np.zeros((rows, FEATURES))
    X[:, 0] = tenant
    X[:, 1] = np.arange(start, start + rows)
    return X


class Call:
    __slots__ = ("X", "maps", "map_index")

    def __init__(self, X, maps, map_index):
        self.X, self.maps, self.map_index = X, maps, map_index


class SteppedThread:
    """Stands in for ModelThread: each call is recorded and scored at once on this thread (by the
    model, or ``scorer``), but answered only when the test releases it.  Calls numbered in
    ``fail`` fail."""

    def __init__(self, scorer=None, fail=()):
        self.calls: list[Call] = []
        self.scorer = scorer
        self.fail = set(fail)
        self._waiting: deque = deque()

    def score_async(self, model, X, maps, map_index=0):
        future = asyncio.get_running_loop().create_future()
        number = len(self.calls)
        self.calls.append(Call(np.array(X), maps, map_index))
        if number in self.fail:
            result = RuntimeError(f"call {number} failed")
        else:
            result = (self.scorer or model.score)(X, maps, map_index)
        self._waiting.append((future, result))
        return future

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    async def release(self) -> None:
        """Answer the oldest call, and let the batcher deliver it and send its next call."""
        future, result = self._waiting.popleft()
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)
        await settle()

    async def release_all(self) -> None:
        while self._waiting:
            await self.release()


async def settle() -> None:
    """Let every task that can run, run (a few loop iterations; no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


def batcher(model, thread, **kw) -> ModelBatcher:
    b = ModelBatcher(model, thread, **kw)
    b.seconds_per_row = 1.0  # a lone request goes to the thread, never inline (unless a test says)
    return b


def first_call_with(calls: list[Call], mask) -> int:
    return next(i for i, c in enumerate(calls) if mask(c.X).any())


@pytest.mark.parametrize("max_rows", [256, 1000])
@pytest.mark.parametrize("arrive_after", [0, 7])  # calls answered before B arrives
@pytest.mark.parametrize("weights", [(1, 1), (4, 1), (1, 4)])
def test_a_late_tenant_is_in_the_next_call_however_much_another_queued(lgb_case, max_rows, arrive_after, weights):
    """Tenant A queues 50,000 rows in five requests; tenant B's one row, arriving while A's call is
    in flight, is in the next call, beside A's rows (each with its own map).  A's requests are
    cut into calls of at most max_rows and come back whole and in order."""
    model = lgb_case.model
    native = native_map_table(_table())
    X_a, _ = training_data(rows=50_000, seed=21)
    parts = np.split(X_a, [7_000, 19_000, 20_000, 37_000])
    b_row = np.full((1, FEATURES), MARK)

    async def run():
        thread = SteppedThread()
        b = batcher(model, thread, max_rows=max_rows, max_queue_rows=100_000)
        a_tasks = [asyncio.ensure_future(b.score_async(p, native, 1, "a", weights[0])) for p in parts]
        await settle()
        for _ in range(arrive_after):
            await thread.release()
        assert thread.in_flight == 1 and b.queued_rows("a") > 40_000
        arrival = len(thread.calls)  # calls sent before B's row arrives
        b_task = asyncio.ensure_future(b.score_async(b_row, native, 2, "b", weights[1]))
        await settle()
        await thread.release_all()
        return [t.result() for t in a_tasks], b_task.result(), thread.calls, arrival, b.stats.take()

    a_results, b_result, calls, arrival, (batch_rows, waits) = asyncio.run(run())
    assert first_call_with(calls, lambda X: X[:, 0] == MARK) == arrival
    mixed = calls[arrival].map_index  # A's rows through map 1, B's through map 2, in one call
    assert isinstance(mixed, np.ndarray) and set(mixed.tolist()) == {1, 2}
    assert all(len(c.X) <= max_rows for c in calls) and sum(len(c.X) for c in calls) == 50_001
    assert batch_rows == [len(c.X) for c in calls] and len(waits) == len(parts) + 1
    assert [len(r) for r in a_results] == [len(p) for p in parts]
    margins = np.concatenate([r.margin for r in a_results])
    assert np.array_equal(margins, model.predict(X_a, margin=True))
    assert np.array_equal(np.concatenate([r.array for r in a_results], axis=1), model.score(X_a, native, 1).array)
    assert np.array_equal(b_result.array, model.score(b_row, native, 2).array)


def test_a_late_tenant_on_the_native_thread(lgb_case):
    """The same with the real model thread: B's row, arriving as A's third call goes out, is in the
    first call sent after it, and A's 50,000 rows come back in order."""
    model = lgb_case.model
    native = native_map_table(_table())
    X_a, _ = training_data(rows=50_000, seed=22)
    parts = np.split(X_a, [10_000, 25_000, 40_000])
    b_row = np.full((1, FEATURES), MARK)
    log: list[tuple] = []

    async def run():
        thread = ModelThread()
        b = batcher(model, thread, max_queue_rows=100_000)
        real = thread.score_async
        b_task = []

        async def b_arrives():
            log.append(("b",))
            return await b.score_async(b_row, native, 0, "b")

        def logged(m, X, maps, map_index=0):
            log.append(("call", len(X), bool((X[:, 0] == MARK).any())))
            if len(log) == 3:
                b_task.append(asyncio.ensure_future(b_arrives()))
            return real(m, X, maps, map_index)

        thread.score_async = logged
        try:
            a_results = await asyncio.gather(*(b.score_async(p, native, 0, "a") for p in parts))
            return a_results, await b_task[0]
        finally:
            thread.close()

    a_results, b_result = asyncio.run(run())
    arrival = log.index(("b",))
    assert log[arrival + 1][0] == "call" and log[arrival + 1][2]  # in the first call after it
    assert all(entry[1] <= 256 for entry in log if entry[0] == "call")
    assert np.array_equal(np.concatenate([r.margin for r in a_results]), model.predict(X_a, margin=True))
    assert np.array_equal(b_result.margin, model.predict(b_row, margin=True))


@settings(max_examples=60)
@given(
    weights=st.lists(st.integers(1, 8), min_size=2, max_size=5),
    max_rows=st.integers(1, 300),
    calls=st.integers(1, 25),
)
def test_backlogged_tenants_share_rows_by_weight(lgb_case, weights, max_rows, calls):
    """Tenants with more rows queued than the calls observed can take: every call is full, each
    tenant's rows come in order, and rows sent / weight differ between tenants by at most one
    quantum (max_rows // total weight, at least 1) at every call.  Requests cancelled meanwhile
    are dropped, not scored."""
    quantum = max(1, max_rows // sum(weights))

    async def run():
        thread = SteppedThread(echo)
        b = batcher(lgb_case.model, thread, max_rows=max_rows)
        native = native_map_table(_table())
        tasks = []
        for i, w in enumerate(weights):
            backlog = calls * max_rows + 1
            cuts = [0, max_rows + 1, max_rows + 1 + (backlog - max_rows - 1) // 2, backlog]  # all queue
            for start, end in pairwise(cuts):
                if end > start:
                    X = tagged(i, start, end - start)
                    tasks.append(asyncio.ensure_future(b.score_async(X, native, 0, f"t{i}", w)))
        await settle()
        for _ in range(calls - 1):
            await thread.release()
        assert len(thread.calls) == calls
        for task in tasks:
            task.cancel()
        await settle()
        await thread.release_all()
        return thread.calls, b.queued_rows()

    seen, queued = asyncio.run(run())
    assert len(seen) == calls and queued == 0  # the cancelled rows were dropped, no call more
    sent = np.zeros(len(weights))
    for call in seen:
        assert len(call.X) == max_rows
        for i in range(len(weights)):
            mine = call.X[call.X[:, 0] == i, 1]
            assert np.array_equal(mine, np.arange(sent[i], sent[i] + len(mine)))  # in order
            sent[i] += len(mine)
        per_weight = sent / np.array(weights)
        assert per_weight.max() - per_weight.min() <= quantum


@settings(max_examples=80)
@given(
    st.integers(1, 300),
    st.lists(  # requests: (tenant, weight, rows, calls answered before it arrives)
        st.tuples(st.integers(0, 3), st.integers(1, 4), st.integers(1, 700), st.integers(0, 3)),
        min_size=1,
        max_size=12,
    ),
)
def test_requests_are_cut_and_joined_in_order(lgb_case, max_rows, plan):
    """Requests of any size from up to four tenants, arriving between calls: every call holds at
    most max_rows rows, each request gets back exactly its rows in order with its own tenant's
    map, and a tenant that had nothing queued is in the first call sent after it arrives when one
    round of every tenant fits in a call (weights adding up to at most max_rows)."""
    native = native_map_table(_table())
    weight_of: dict[int, int] = {}  # each tenant's largest weight

    async def run():
        thread = SteppedThread(echo)
        b = batcher(lgb_case.model, thread, max_rows=max_rows)
        served: list[tuple] = []
        next_row = [0, 0, 0, 0]

        async def request(tenant, weight, rows):
            X = tagged(tenant, next_row[tenant], rows)
            next_row[tenant] += rows
            arrival, idle = len(thread.calls), b.queued_rows(f"t{tenant}") == 0
            scores = await b.score_async(X, native, 1 + tenant % 2, f"t{tenant}", weight)
            served.append((X, scores, arrival, idle))

        tasks = []
        for tenant, weight, rows, wait in plan:
            weight_of[tenant] = max(weight, weight_of.get(tenant, 0))
            for _ in range(min(wait, thread.in_flight)):
                await thread.release()
            tasks.append(asyncio.ensure_future(request(tenant, weight, rows)))
            await settle()
        await thread.release_all()
        await asyncio.gather(*tasks)
        return served, thread.calls, b.stats.take()

    served, calls, (batch_rows, waits) = asyncio.run(run())
    assert len(served) == len(plan) and len(waits) == len(plan)
    assert all(0 < len(c.X) <= max_rows for c in calls)
    assert batch_rows == [len(c.X) for c in calls] and sum(batch_rows) == sum(p[2] for p in plan)
    for X, scores, arrival, idle in served:
        assert np.array_equal(scores.margin, X[:, 0]) and np.array_equal(scores.corrected, X[:, 1])
        assert np.array_equal(scores.mapped, 1 + X[:, 0] % 2)
        if idle and sum(weight_of.values()) <= max_rows:
            first = first_call_with(calls, lambda C, X=X: (C[:, 0] == X[0, 0]) & (C[:, 1] == X[0, 1]))
            assert first == arrival


def test_a_tenant_over_its_queue_is_refused_alone(lgb_case):
    """max_queue_rows bounds each tenant's own queue: A's fourth 300-row request is refused while
    B, whose queue is its own, queues as many rows as A did; everything accepted is served."""
    model = lgb_case.model
    native = native_map_table(_table())
    X, _ = training_data(rows=2_000, seed=23)

    async def run():
        thread = SteppedThread()
        b = batcher(model, thread, max_rows=100, max_queue_rows=1000)
        tasks, outcomes = [], {}
        first = asyncio.ensure_future(b.score_async(X[:50], native, 0, "a"))  # the model busy
        await settle()
        for tenant, offset in (("a", 0), ("b", 1000)):
            for k in range(4):
                rows = X[offset + 300 * k : offset + 300 * (k + 1)] if k < 3 else X[1800:1950]
                task = asyncio.ensure_future(b.score_async(rows, native, 0, tenant))
                await settle()
                if task.done():
                    outcomes[tenant, k] = str(task.exception())
                else:
                    outcomes[tenant, k] = "queued"
                    tasks.append((rows, task))
        await thread.release_all()
        return await first, [(rows, await t) for rows, t in tasks], outcomes

    first, served, outcomes = asyncio.run(run())
    for tenant in ("a", "b"):
        assert [outcomes[tenant, k] for k in range(3)] == ["queued"] * 3
        assert outcomes[tenant, 3] == f"tenant '{tenant}' has 900 rows queued for model {model.key}"
    assert len(served) == 6
    for rows, scores in [(X[:50], first), *served]:
        assert np.array_equal(scores.array, model.score(rows, native, 0).array)


def test_past_the_model_bound_the_heaviest_tenant_loses_its_newest_request(lgb_case):
    """All tenants together queue at most QUEUE_SHARES * max_queue_rows rows; past that, a request
    of a tenant that would hold the most rows is refused, and one of a lighter tenant pushes out
    the newest request of the heaviest (which fails with Overloaded)."""
    model = lgb_case.model
    native = native_map_table(_table())
    bound = QUEUE_SHARES * 100

    async def run():
        thread = SteppedThread(echo)
        b = batcher(model, thread, max_rows=10, max_queue_rows=100)
        tasks = {}

        async def send(name, tenant, rows):
            tasks[name] = asyncio.ensure_future(b.score_async(tagged(tenant, 0, rows), native, 0, f"t{tenant}"))
            await settle()
            assert b.queued_rows() <= bound

        await send("busy", 9, 5)
        for tenant in range(QUEUE_SHARES):  # every tenant at its own bound: the model at its bound
            await send(f"{tenant}-1", tenant, 50)
            await send(f"{tenant}-2", tenant, 50)
        assert b.queued_rows() == bound
        await send("big", 7, 150)  # its tenant would hold the most: refused, nothing pushed out
        assert tasks["big"].done() and b.queued_rows() == bound
        await send("light", 8, 10)  # pushes out tenant 0's newest request
        queued = {t: b.queued_rows(f"t{t}") for t in (0, 1, 8)}
        await thread.release_all()
        outcomes = {}
        for name, task in tasks.items():
            try:
                outcomes[name] = await task
            except Overloaded as exc:
                outcomes[name] = exc
        return outcomes, queued

    outcomes, queued = asyncio.run(run())
    assert queued == {0: 50, 1: 100, 8: 10}
    assert isinstance(outcomes["big"], Overloaded) and "'t7' holding 0" in str(outcomes["big"])
    assert isinstance(outcomes["0-2"], Overloaded) and "'t0' the most" in str(outcomes["0-2"])
    for name, result in outcomes.items():
        if name not in ("big", "0-2"):
            assert isinstance(result, Scores) and np.array_equal(result.corrected, np.arange(len(result))), name


def test_batches_never_mix_map_tables_and_carry_each_tenants_map(lgb_case):
    """A deployment swap: A's rows use the old table, B's and C's the new, with their own maps.
    No call mixes tables (each call's rows are the tenants of its table), B and C share calls
    with one map per row, and everyone gets the scores of their own table and map."""
    model = lgb_case.model
    tables = [_table(), MapTable([identity_map(), QuantileMap([0.0, 0.5, 1.0], [0.0, 0.1, 1.0])])]
    natives = [native_map_table(t) for t in tables]
    X, _ = training_data(rows=3_000, seed=24)
    plan = {"a": (X[:1000], natives[0], 2), "b": (X[1000:2000], natives[1], 1), "c": (X[2000:], natives[1], 0)}

    async def run():
        thread = SteppedThread()
        b = batcher(model, thread, max_rows=128)
        tasks = {t: asyncio.ensure_future(b.score_async(rows, maps, m, t)) for t, (rows, maps, m) in plan.items()}
        await settle()
        await thread.release_all()
        return {t: await task for t, task in tasks.items()}, thread.calls

    results, calls = asyncio.run(run())
    row_of = {tuple(r): t for t, (rows, _, _) in plan.items() for r in np.nan_to_num(rows, nan=-999.0)}
    per_row_maps = 0
    for call in calls:
        owners = {row_of[tuple(r)] for r in np.nan_to_num(call.X, nan=-999.0)}
        assert owners <= ({"a"} if call.maps is natives[0] else {"b", "c"})
        per_row_maps += isinstance(call.map_index, np.ndarray)
    assert per_row_maps > 0
    for t, (rows, maps, m) in plan.items():
        assert np.array_equal(results[t].array, model.score(rows, maps, m).array)


def test_a_failed_call_fails_its_requests_and_drops_their_rest(lgb_case):
    """A call that fails fails the requests with rows in it; the rest of a cut request that failed
    is not scored, and a tenant queued behind it is served."""
    model = lgb_case.model
    native = native_map_table(_table())
    X, _ = training_data(rows=1_030, seed=25)

    async def run():
        thread = SteppedThread(fail={1})
        b = batcher(model, thread, max_rows=100)
        a = asyncio.ensure_future(b.score_async(X[:1000], native, 0, "a"))
        await settle()
        await thread.release()  # call 1 (A's second chunk) is sent, and will fail
        other = asyncio.ensure_future(b.score_async(X[1000:], native, 0, "b"))
        await settle()
        await thread.release_all()
        with pytest.raises(RuntimeError, match="call 1 failed"):
            await a
        return await other, thread.calls

    b_result, calls = asyncio.run(run())
    assert [len(c.X) for c in calls] == [100, 100, 30]
    assert np.array_equal(b_result.array, model.score(X[1000:], native, 0).array)


def test_light_load_keeps_the_direct_paths(lgb_case):
    """A lone small request at an idle model runs at once (inline here: nothing reaches the
    thread, nothing queues); one larger than max_rows is cut even at an idle model."""
    model = lgb_case.model
    native = native_map_table(_table())
    X, _ = training_data(rows=101, seed=26)

    async def run():
        thread = SteppedThread()
        b = ModelBatcher(model, thread, max_rows=100)
        b.seconds_per_row = 1e-9  # cheap: inline
        small = await b.score_async(X[:3], native, 1, "a")
        calls_after_small = len(thread.calls)
        big = asyncio.ensure_future(b.score_async(X, native, 1, "a"))
        await settle()
        await thread.release_all()
        return small, calls_after_small, await big, thread.calls

    small, calls_after_small, big, calls = asyncio.run(run())
    assert calls_after_small == 0 and [len(c.X) for c in calls] == [100, 1]
    assert np.array_equal(small.array, model.score(X[:3], native, 1).array)
    assert np.array_equal(big.array, model.score(X, native, 1).array)


def test_the_model_thread_reports_each_calls_own_time(lgb_case):
    """A call's seconds on the model thread (what max_call_us's estimate learns from) are its own:
    the second of two calls submitted together waits for the first, and its seconds leave that
    wait out."""
    model = lgb_case.model
    native = native_map_table(_table())
    X, _ = training_data(rows=20_000, seed=29)

    async def run():
        thread = ModelThread()
        try:
            start = time.perf_counter()
            first = thread.score_async(model, X, native, 0)
            second = thread.score_async(model, X, native, 0)
            a = await first
            b = await second
            return a.seconds, b.seconds, time.perf_counter() - start
        finally:
            thread.close()

    a, b, wall = asyncio.run(run())
    assert a > 0 and b > 0 and a + b <= wall  # one after the other, each within the wait for both


class Clock:
    """time.perf_counter for the batcher, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def test_calls_are_cut_by_the_time_they_take(lgb_case, monkeypatch):
    """With max_call_us, a call takes as many rows as the model's recent calls on the thread say
    fit in that time (at least MIN_CALL_ROWS, at most max_rows), and a request longer than that
    is cut even at an idle model; calls under MIN_CALL_ROWS rows teach it nothing."""
    model = lgb_case.model
    native = native_map_table(_table())
    X, _ = training_data(rows=400, seed=28)
    clock = Clock()
    monkeypatch.setattr(batching, "time", clock)

    async def run():
        thread = SteppedThread()
        b = batcher(model, thread, max_rows=200, max_call_us=1000)

        async def release(seconds_per_row: float) -> None:  # the call in flight took this long a row
            clock.now += len(thread.calls[-1].X) * seconds_per_row
            await thread.release()

        assert b.call_rows() == 200  # nothing learned yet
        whole = asyncio.ensure_future(b.score_async(X[:210], native, 1, "a"))
        await settle()
        await release(10e-6)  # 200 rows at 10 us a row: 100 rows fit in 1 ms
        assert b.call_rows() == 100
        await release(0.1)  # the 10 rows left: a slow call, but too small to learn from
        assert b.call_rows() == 100
        cut = asyncio.ensure_future(b.score_async(X[210:], native, 1, "a"))  # 190 rows, idle model
        await settle()
        await release(500e-6)  # the running estimate, 108 us a row, fits 9 rows: MIN_CALL_ROWS go
        assert b.call_rows() == MIN_CALL_ROWS
        while thread.in_flight:
            await release(500e-6)
        return await whole, await cut, thread.calls

    whole, cut, calls = asyncio.run(run())
    assert [len(c.X) for c in calls] == [200, 10, 100] + [MIN_CALL_ROWS] * 5 + [90 - 5 * MIN_CALL_ROWS]
    assert np.array_equal(whole.array, model.score(X[:210], native, 1).array)
    assert np.array_equal(cut.array, model.score(X[210:], native, 1).array)


def ensemble(members: tuple[ModelBatcher, ...], table, native) -> Predictor:
    """A mean-logit ensemble of ``members`` whose tenants all use map 1."""
    names = tuple(f"f{i}" for i in range(FEATURES))
    return Predictor("p", "1", "fraud", members, "mean_logit", names, table, native, {None: 1}, None)


def test_predictors_queue_rows_as_their_tenant_in_every_member(lgb_case):
    """Predictor.score_async hands the tenant and its weight to each member's batcher (an ensemble
    of two here): the rows wait in that tenant's queue at both models."""
    model = lgb_case.model
    table = _table()
    native = native_map_table(table)
    X, _ = training_data(rows=300, seed=27)

    async def run():
        threads = [SteppedThread(), SteppedThread()]
        members = tuple(batcher(model, t, max_rows=100) for t in threads)
        predictor = ensemble(members, table, native)
        task = asyncio.ensure_future(predictor.score_async(X, 1, "acme", 3))
        await settle()
        queued = [(m.queued_rows("acme"), m._tenants["acme"].weight) for m in members]
        for t in threads:
            await t.release_all()
        return await task, queued, predictor

    scores, queued, predictor = asyncio.run(run())
    assert queued == [(200, 3), (200, 3)]  # the first 100 rows of each in flight
    np.testing.assert_allclose(scores.array, predictor.score(X, 1).array, rtol=1e-12, atol=1e-15)


def test_an_ensemble_member_refused_cancels_the_others(lgb_case):
    """When one member's queue refuses the rows (Overloaded), the other member's rows are taken
    back unscored: nobody waits for them, and the request's quota was already given back."""
    model = lgb_case.model
    table = _table()
    native = native_map_table(table)
    X, _ = training_data(rows=300, seed=28)

    async def run():
        threads = [SteppedThread(), SteppedThread()]
        roomy = batcher(model, threads[0], max_rows=100, max_queue_rows=100_000)
        full = batcher(model, threads[1], max_rows=100, max_queue_rows=100)
        predictor = ensemble((roomy, full), table, native)
        first = asyncio.ensure_future(full.score_async(X, native, 0, "acme"))  # fills acme's queue at `full`
        await settle()
        with pytest.raises(Overloaded):
            await predictor.score_async(X, 1, "acme", 1)
        for t in threads:
            await t.release_all()
        await first
        return [len(c.X) for c in threads[0].calls]

    scored = asyncio.run(run())
    assert scored == [100], scored  # the chunk already in flight when the other member refused; no more
