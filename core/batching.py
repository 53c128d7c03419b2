"""Micro-batching: rows for one model from concurrent requests of any tenant
coalesce into one native call, drawn fairly across tenants.

Model calls run on a native thread (muse.compile's ``ModelThread``), off the event loop's
thread -- and, on a machine with a core to spare, off its core: a 500-tree
model's code is larger than a core's L2, and sharing one core made both the
model (27 us in situ against 9 in a tight loop) and the Python around it
several times slower (measured in-process; bench/request_path.py shows what
is left on the loop).  The thread never
takes the GIL; it signals completions on an eventfd the loop watches, so a
hand-off costs the loop a few microseconds and no GIL hand-over.

A request that finds its model idle (and fits in one call) is sent at once.
At light load it runs on the loop itself, which spares the hand-off's two
wake-ups (~35 us of p50 at 300-2,000 req/s, measured with bench/loadgen.c);
the test is the model's share of the loop: its cost per call (learned from
calls on the loop) against the recent time between calls, at most
INLINE_SHARE, and at most ``inline_max_us`` a call.  Under load every call
goes to the thread, since the loop is what saturates: at 8,000 req/s inline
calls took the loop from 81 to 105 us a request, and the peak from ~13,000
to ~10,000 req/s.  Requests that arrive while a call is in flight queue, and
when it returns the next batch (up to ``max_rows``) goes to the thread in the
next call.  So batches grow with load without a timer, a lone request never
sits out a window, and under load the loop only decodes, routes and answers.
``max_wait_us`` adds an optional linger for callers that prefer bigger
batches to lower latency.

Tenants (issue 15).  Queued rows wait in one queue per tenant, and a batch is
drawn across the tenants with rows waiting by deficit round robin over rows:
each turn a tenant may send ``quantum * weight`` rows, where the quantum is
``max_rows // (sum of the waiting tenants' weights)`` (at least 1) as the
batch starts, so one round of every waiting tenant fits in one call (a turn
a batch boundary interrupted is cut to the current size).  A tenant that
starts to wait is therefore in the next call however many rows others have
queued (unless the waiting tenants' weights add up to more than
``max_rows``, or the call is cut at a map table change), and backlogged
tenants share rows in proportion to their weights: at any moment, each one's
rows sent divided by its weight are within one quantum of every other's.

A request is cut wherever a batch ends: one of 8,000 rows becomes calls of
at most ``max_rows`` interleaved with other tenants' rows (a request larger
than a call never takes the idle model's direct path), and its future
resolves when its last chunk is done, with the chunks' scores joined in
order.  A call takes at most ``max_rows`` rows, and, with ``max_call_us``,
as many as the model's recent calls say fit in that time (at least
MIN_CALL_ROWS): one call's time bounds what a tenant's burst adds to another
tenant's wait, whatever the model costs a row.  The estimate is each call's own
time on the thread, not its wait behind other models' calls.  (A 500-tree
model's 256 rows take ~4 ms.  In ad-hoc runs of bench/isolation.py's harness,
a victim's one-row p99 beside one 8,000-row request every 1.6 s was 6.5-8.7 ms
with max_rows alone and 3.8-6.4 ms with max_call_us = 1000; the 8,000-row
request's own p50 went from 68-75 ms to 73-111 ms, for its extra hand-offs.)

``max_queue_rows`` bounds each tenant's own queue (a tenant with nothing
queued may queue any one request): a tenant past it gets Overloaded (503),
others are unaffected.  All tenants together queue at most QUEUE_SHARES times
``max_queue_rows`` rows (memory: tenant names are many when auth is off);
past that the tenant holding the most rows per unit of weight loses its
newest requests (they fail with Overloaded), or the arriving request is
refused when its tenant would be that tenant, so a light tenant is served
whatever the others queue (longest-queue drop).

Calibration runs in the same native call, right after the model (see
muse.compile.native_maps): a batch's rows share one map table (a batch is cut
where the table changes, as it does once during a deployment swap) and go
through one map, or one map per row when tenants with their own maps mix."""

from __future__ import annotations

import asyncio
import time
from collections import deque

import numpy as np

from muse.compile import CompiledModel, ModelThread, NativeMapTable, Scores

MIN_CALL_ROWS = 16  # a call cut by time still takes this many rows: below it, hand-offs cost more than rows
INLINE_SHARE = 0.05  # inline calls may take this share of the loop's time, at most
QUEUE_SHARES = 4  # all tenants together queue at most this many times max_queue_rows


class Overloaded(RuntimeError):
    """A tenant's queue at the model is full (or the model's, and this tenant holds the most of
    it): shed its load instead of queueing without bound."""


class BatchStats:
    """One model's native calls since the server last collected them: rows per call and each
    request's wait for its (first) call.  Plain lists, appended on the event loop and handed
    over whole by ``take`` (the server bins them into metrics in bulk: a per-request histogram
    update cost more than the rest of the batcher)."""

    __slots__ = ("rows", "seconds", "waits")

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.waits: list[float] = []
        # tenant -> seconds of model calls, each call's time shared by its rows (showback)
        self.seconds: dict[str, float] = {}

    def take(self) -> tuple[list[int], list[float]]:
        rows, waits = self.rows, self.waits
        self.rows, self.waits = [], []
        return rows, waits

    def take_seconds(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds

    def charge(self, tenant: str, seconds: float) -> None:
        self.seconds[tenant] = self.seconds.get(tenant, 0.0) + seconds


class _Request:
    """One caller's rows, sent in one chunk or, cut at batch boundaries, in several."""

    __slots__ = ("X", "enqueued", "future", "map_index", "maps", "parts", "sent", "tenant")

    def __init__(
        self,
        X: np.ndarray,
        future: asyncio.Future[Scores],
        maps: NativeMapTable,
        map_index: int,
        enqueued: float,
        tenant: str,
    ):
        self.tenant = tenant
        self.X = X
        self.future = future
        self.maps = maps
        self.map_index = map_index
        self.enqueued = enqueued
        self.sent = 0  # rows handed to batches so far
        self.parts: list[Scores] | None = None  # a cut request's scores so far, chunk by chunk


class _Tenant:
    """One tenant's queue at one model: its requests in order, the rows they still have to send,
    and its deficit (rows it may still send in its current turn)."""

    __slots__ = ("name", "weight", "requests", "rows", "deficit")

    def __init__(self, name: str, weight: int):
        self.name = name
        self.weight = weight
        self.requests: deque[_Request] = deque()
        self.rows = 0
        self.deficit = 0


# A batch: (request, first row, end row) per chunk, in the order of the call's rows.
_Chunks = list[tuple[_Request, int, int]]


class ModelBatcher:
    def __init__(
        self,
        model: CompiledModel,
        thread: ModelThread,
        stats: BatchStats | None = None,
        max_rows: int = 256,
        max_wait_us: int = 0,
        max_queue_rows: int = 16384,
        inline_max_us: int = 2000,
        max_call_us: int = 0,  # 0: calls bounded by max_rows only (the deployment's default is set in core/spec.py)
    ):
        self.model = model
        self.thread = thread
        self.stats = stats if stats is not None else BatchStats()
        self.configure(max_rows, max_wait_us, max_queue_rows, inline_max_us, max_call_us)
        self._tenants: dict[str, _Tenant] = {}  # the tenants with rows queued
        self._ring: deque[_Tenant] = deque()  # the same tenants, in turn; the first is sending
        self._weight = 0  # the sum of their weights
        self._queued_rows = 0
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None
        self.seconds_per_row = 0.0  # running estimate, for choosing inline vs thread
        self.call_seconds_per_row = 0.0  # the same for calls on the thread, their own time: for max_call_us
        self._last_arrival = 0.0
        self._gap = 0.0  # running mean of the time between requests

    def configure(
        self, max_rows: int, max_wait_us: int, max_queue_rows: int, inline_max_us: int, max_call_us: int = 0
    ) -> None:
        self.max_rows = max_rows
        self.max_wait = max_wait_us / 1e6
        self.max_queue_rows = max_queue_rows
        self.inline_max = inline_max_us / 1e6
        self.max_call = max_call_us / 1e6

    def call_rows(self) -> int:
        """Rows the next call may take: ``max_rows``, or fewer when the model's recent calls on the
        thread say that many would take longer than ``max_call_us``."""
        per_row = self.call_seconds_per_row
        if not self.max_call or not per_row:
            return self.max_rows
        return min(self.max_rows, max(MIN_CALL_ROWS, int(self.max_call / per_row + 1e-9)))

    async def score_async(
        self, X: np.ndarray, maps: NativeMapTable, map_index: int, tenant: str, weight: int = 1
    ) -> Scores:
        """The model's scores of X, mapped through map ``map_index`` of ``maps``, for ``tenant``
        (whose share of the model, when tenants wait for it, is in proportion to ``weight``).

        A request that finds the model idle and fits in one call goes out at once from its own
        task (no queue, no drain task): on the loop while the model's share of it stays under
        INLINE_SHARE, else on the thread.  Other requests queue, per tenant; a drain task sends
        them after.  Overloaded when the tenant's queue is full."""
        now = time.perf_counter()  # quick to follow a burst: ~10 requests from idle to busy
        self._gap = 0.75 * self._gap + 0.25 * min(now - self._last_arrival, 0.01)
        self._last_arrival = now
        if self._draining or self.max_wait or len(X) > self.call_rows():
            return await self._queue(X, maps, map_index, tenant, weight, now)
        self._draining = True
        try:
            cost = len(X) * self.seconds_per_row
            if cost <= self.inline_max and cost <= INLINE_SHARE * self._gap:
                out = self._score_here(X, maps, map_index)
            else:
                out = await self.thread.score_async(self.model, X, maps, map_index)
            self.stats.charge(tenant, out.seconds or time.perf_counter() - now)  # its own time on the thread
        finally:
            if self._ring:
                self._drain_task = asyncio.get_running_loop().create_task(self._drain())
            else:
                self._draining = False
        self.stats.rows.append(len(X))
        self.stats.waits.append(0.0)
        return out

    def _queue(
        self, X: np.ndarray, maps: NativeMapTable, map_index: int, tenant: str, weight: int, now: float
    ) -> asyncio.Future[Scores]:
        """X queued in its tenant's queue: the future of its scores."""
        if weight < 1:
            raise ValueError(f"weight must be at least 1, got {weight}")
        n = len(X)
        t = self._tenants.get(tenant)
        if t is not None and t.rows + n > self.max_queue_rows:  # a tenant with nothing queued takes any request
            raise Overloaded(f"tenant {tenant!r} has {t.rows} rows queued for model {self.model.key}")
        if self._queued_rows and self._queued_rows + n > QUEUE_SHARES * self.max_queue_rows:
            self._push_out(t, tenant, n, weight)
        if t is None:
            t = self._tenants[tenant] = _Tenant(tenant, weight)
            self._ring.append(t)
            self._weight += weight
        elif t.weight != weight:
            self._weight += weight - t.weight
            t.weight = weight
        loop = asyncio.get_running_loop()
        request = _Request(X, loop.create_future(), maps, map_index, now, tenant)
        t.requests.append(request)
        t.rows += n
        self._queued_rows += n
        if not self._draining:
            self._draining = True
            self._drain_task = loop.create_task(self._drain())  # held: the loop keeps only weak refs
        return request.future

    def _push_out(self, t: _Tenant | None, tenant: str, n: int, weight: int) -> None:
        """Room for n rows of ``tenant`` within the model's bound: longest-queue drop.  While the
        bound would be passed, the tenant holding the most rows per unit of weight loses its
        newest request (it fails with Overloaded); when that would be ``tenant`` itself, with
        the n rows counted, the arriving request is refused instead."""
        rows = (t.rows if t is not None else 0) + n
        if t is not None:
            weight = t.weight
        while self._queued_rows and self._queued_rows + n > QUEUE_SHARES * self.max_queue_rows:
            heaviest = max(self._ring, key=lambda u: u.rows / u.weight)
            if heaviest is t or heaviest.rows * weight <= rows * heaviest.weight:
                raise Overloaded(
                    f"model {self.model.key} has {self._queued_rows} rows queued, "
                    f"tenant {tenant!r} holding {rows - n} of them"
                )
            request = heaviest.requests.pop()
            left = len(request.X) - request.sent
            heaviest.rows -= left
            self._queued_rows -= left
            if not request.future.done():
                request.future.set_exception(
                    Overloaded(
                        f"model {self.model.key} has {self._queued_rows + left} rows queued, "
                        f"tenant {heaviest.name!r} the most of them"
                    )
                )
            if not heaviest.requests:
                self._ring.remove(heaviest)
                self._leave(heaviest)

    def queued_rows(self, tenant: str | None = None) -> int:
        """Rows waiting for a call: ``tenant``'s, or every tenant's."""
        if tenant is None:
            return self._queued_rows
        t = self._tenants.get(tenant)
        return 0 if t is None else t.rows

    def _leave(self, t: _Tenant) -> None:
        """Forget a tenant whose queue emptied (already out of the ring)."""
        del self._tenants[t.name]
        self._weight -= t.weight

    async def _drain(self) -> None:
        try:
            while self._ring:
                if self.max_wait and self._queued_rows < self.call_rows():
                    await asyncio.sleep(self.max_wait)
                chunks, rows = self._take(time.perf_counter())
                if not chunks:  # every request it found was gone
                    continue
                called = time.perf_counter()
                try:
                    out = await self.thread.score_async(self.model, *_batch(chunks))
                except Exception as exc:  # a failed batch fails its own requests only
                    for request, _, _ in chunks:
                        if not request.future.done():
                            request.future.set_exception(exc)  # and their later chunks are dropped
                    continue
                # the call's own time on the thread: not its wait behind other models' calls on
                # it, nor the loop's delay in taking the answer
                per_row = (out.seconds or time.perf_counter() - called) / rows
                if rows >= MIN_CALL_ROWS:  # smaller calls are mostly fixed costs
                    self.call_seconds_per_row = (
                        0.8 * self.call_seconds_per_row + 0.2 * per_row if self.call_seconds_per_row else per_row
                    )
                start = 0
                for request, first, end in chunks:
                    self.stats.charge(request.tenant, per_row * (end - first))
                    stop = start + end - first
                    if not request.future.done():  # the caller may have gone away
                        part = out.rows(start, stop)
                        if end - first == len(request.X):  # the whole request
                            request.future.set_result(part)
                        elif request.parts is None:  # its first chunk
                            request.parts = [part]
                        else:
                            request.parts.append(part)
                            if end == len(request.X):  # its last chunk
                                request.future.set_result(Scores.concat(request.parts))
                    start = stop
                self.stats.rows.append(rows)
        finally:
            self._draining = False

    def _take(self, now: float) -> tuple[_Chunks, int]:
        """The next batch: up to ``call_rows()`` rows, drawn from the tenants' queues by deficit round
        robin, that share one map table (one native call calibrates with one table).  A request
        is cut where the batch or its tenant's turn ends; the rest waits for a later batch."""
        ring, room = self._ring, self.call_rows()
        size = room
        chunks: _Chunks = []
        if not ring:
            return chunks, 0
        maps = None
        quantum = room // self._weight or 1  # one round of every tenant waiting now fits in the batch
        head = ring[0]
        if head.deficit > quantum * head.weight:  # a turn carried over from before more tenants waited
            head.deficit = quantum * head.weight
        while room and ring:
            t = ring[0]
            request = t.requests[0]
            first = request.sent
            left = len(request.X) - first
            if request.future.done():  # its caller went away, or one of its chunks failed
                t.requests.popleft()
                t.rows -= left
                self._queued_rows -= left
                if not t.requests:
                    ring.popleft()
                    self._leave(t)
                continue
            if maps is None:
                maps = request.maps
            elif request.maps is not maps:
                break
            if not t.deficit:  # its turn starts
                t.deficit = quantum * t.weight
            n = min(left, t.deficit, room)
            if not first:
                self.stats.waits.append(now - request.enqueued)
            request.sent = first + n
            chunks.append((request, first, first + n))
            t.deficit -= n
            t.rows -= n
            room -= n
            if n == left:
                t.requests.popleft()
                if not t.requests:  # its turn ends with its queue
                    ring.popleft()
                    self._leave(t)
                    t.deficit = 0
                    continue
            if not t.deficit:  # its turn ends: the next tenant's starts
                ring.rotate(-1)
        rows = size - room
        self._queued_rows -= rows
        return chunks, rows

    def _score_here(self, X: np.ndarray, maps: NativeMapTable, map_index: int) -> Scores:
        """The call on the loop's thread; its cost per row (not the thread's round trip, which
        is mostly waiting) is what decides whether a lone request runs here."""
        t0 = time.perf_counter()
        out = self.model.score(X, maps, map_index)
        per_row = (time.perf_counter() - t0) / len(X)
        self.seconds_per_row = per_row if not self.seconds_per_row else 0.9 * self.seconds_per_row + 0.1 * per_row
        return out


def _batch(chunks: _Chunks) -> tuple[np.ndarray, NativeMapTable, int | np.ndarray]:
    """A batch's rows, its map table, and one map for all its rows when its chunks share one
    (the steady state), else one per row."""
    request, first, end = chunks[0]
    if len(chunks) == 1:
        X = request.X if end - first == len(request.X) else request.X[first:end]
        return X, request.maps, request.map_index
    X = np.concatenate([r.X if b - a == len(r.X) else r.X[a:b] for r, a, b in chunks])
    index = request.map_index
    if all(r.map_index == index for r, _, _ in chunks):
        return X, request.maps, index
    return (
        X,
        request.maps,
        np.repeat(np.array([r.map_index for r, _, _ in chunks], dtype=np.int64), [b - a for _, a, b in chunks]),
    )
