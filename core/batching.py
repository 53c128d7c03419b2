"""Micro-batching: rows for one model from concurrent requests of any tenant
coalesce into one native call.

Model calls run on a native thread (muse.compile's ``ModelThread``), off the event loop's
thread -- and, on a machine with a core to spare, off its core: a 500-tree
model's code is larger than a core's L2, and sharing one core made both the
model (27 us in situ against 9 in a tight loop) and the Python around it
several times slower (measured in-process; bench/request_path.py shows what
is left on the loop).  The thread never
takes the GIL; it signals completions on an eventfd the loop watches, so a
hand-off costs the loop a few microseconds and no GIL hand-over.

A request that finds its model idle is sent at once.  At light load it runs
on the loop itself, which spares the hand-off's two wake-ups (~35 us of p50
at 300-2,000 req/s, measured with bench/loadgen.c); the test is the model's
share of the loop: its cost per call (learned from calls on the loop) against
the recent time between calls, at most INLINE_SHARE, and at most
``inline_max_us`` a call.  Under load every call goes to the thread, since
the loop is what saturates: at 8,000 req/s inline calls took the loop from
81 to 105 us a request, and the peak from ~13,000 to ~10,000 req/s.
Requests that arrive while a call is in flight queue, and when it returns
everything queued (up to ``max_rows``) goes to the thread in the next call.
So batches grow with load without a timer, a lone request never sits out a
window, and under load the loop only decodes, routes and answers.
``max_wait_us`` adds an optional linger for callers that prefer bigger
batches to lower latency.

Calibration runs in the same native call, right after the model (see
muse.compile.native_maps): a batch's rows share one map table (a batch is cut
where the table changes, as it does once during a deployment swap) and go
through one map, or one map per row when tenants with their own maps mix."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from muse.compile import CompiledModel, ModelThread, NativeMapTable, Scores

INLINE_SHARE = 0.05  # inline calls may take this share of the loop's time, at most


class Overloaded(RuntimeError):
    """The model's queue is full: shed load instead of queueing without bound."""


class BatchStats:
    """One model's native calls since the server last collected them: rows per call and each
    request's wait for its call.  Plain lists, appended on the event loop and handed over whole
    by ``take`` (the server bins them into metrics in bulk: a per-request histogram update
    cost more than the rest of the batcher)."""

    __slots__ = ("rows", "waits")

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.waits: list[float] = []

    def take(self) -> tuple[list[int], list[float]]:
        rows, waits = self.rows, self.waits
        self.rows, self.waits = [], []
        return rows, waits


class _Item:
    __slots__ = ("X", "enqueued", "future", "map_index", "maps")

    def __init__(
        self, X: np.ndarray, future: asyncio.Future[Scores], maps: NativeMapTable, map_index: int, enqueued: float
    ):
        self.X = X
        self.future = future
        self.maps = maps
        self.map_index = map_index
        self.enqueued = enqueued


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
    ):
        self.model = model
        self.thread = thread
        self.stats = stats if stats is not None else BatchStats()
        self.configure(max_rows, max_wait_us, max_queue_rows, inline_max_us)
        self._pending: list[_Item] = []
        self._queued_rows = 0
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None
        self.seconds_per_row = 0.0  # running estimate, for choosing inline vs thread
        self._last_arrival = 0.0
        self._gap = 0.0  # running mean of the time between requests

    def configure(self, max_rows: int, max_wait_us: int, max_queue_rows: int, inline_max_us: int) -> None:
        self.max_rows = max_rows
        self.max_wait = max_wait_us / 1e6
        self.max_queue_rows = max_queue_rows
        self.inline_max = inline_max_us / 1e6

    async def score_async(self, X: np.ndarray, maps: NativeMapTable, map_index: int = 0) -> Scores:
        """The model's scores of X, mapped through map ``map_index`` of ``maps``.

        A request that finds the model idle goes out at once from its own task (no queue, no
        drain task): on the loop while the model's share of it stays under INLINE_SHARE, else on
        the thread.  Requests arriving meanwhile queue; a drain task takes them after."""
        if self._queued_rows and self._queued_rows + len(X) > self.max_queue_rows:  # an idle model takes any batch
            raise Overloaded(f"model {self.model.key} has {self._queued_rows} rows queued")
        now = time.perf_counter()  # quick to follow a burst: ~10 requests from idle to busy
        self._gap = 0.75 * self._gap + 0.25 * min(now - self._last_arrival, 0.01)
        self._last_arrival = now
        if self._draining or self.max_wait:
            loop = asyncio.get_running_loop()
            item = _Item(X, loop.create_future(), maps, map_index, now)
            self._pending.append(item)
            self._queued_rows += len(X)
            if not self._draining:
                self._draining = True
                self._drain_task = loop.create_task(self._drain())  # held: the loop keeps only weak refs
            return await item.future
        self._draining = True
        try:
            cost = len(X) * self.seconds_per_row
            if cost <= self.inline_max and cost <= INLINE_SHARE * self._gap:
                out = self._score_here(X, maps, map_index)
            else:
                out = await self.thread.score_async(self.model, X, maps, map_index)
        finally:
            if self._pending:
                self._drain_task = asyncio.get_running_loop().create_task(self._drain())
            else:
                self._draining = False
        self.stats.rows.append(len(X))
        self.stats.waits.append(0.0)
        return out

    async def _drain(self) -> None:
        try:
            while self._pending:
                if self.max_wait and self._queued_rows < self.max_rows:
                    await asyncio.sleep(self.max_wait)
                items, rows = self._take()
                started = time.perf_counter()
                try:
                    X = items[0].X if len(items) == 1 else np.concatenate([item.X for item in items])
                    out = await self.thread.score_async(self.model, X, items[0].maps, _map_index(items))
                except Exception as exc:  # a failed batch fails its own requests only
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                start = 0
                for item in items:
                    end = start + len(item.X)
                    if not item.future.done():  # the caller may have gone away
                        item.future.set_result(out.rows(start, end))
                    start = end
                self.stats.rows.append(rows)
                self.stats.waits.extend([started - item.enqueued for item in items])
        finally:
            self._draining = False

    def _take(self) -> tuple[list[_Item], int]:
        """The next batch: queued items in order, up to ``max_rows``, that share the first one's
        map table (one native call calibrates with one table)."""
        pending = self._pending
        maps = pending[0].maps
        take, rows = 1, len(pending[0].X)
        while take < len(pending) and pending[take].maps is maps and rows + len(pending[take].X) <= self.max_rows:
            rows += len(pending[take].X)
            take += 1
        items, self._pending = pending[:take], pending[take:]
        self._queued_rows -= rows
        return items, rows

    def _score_here(self, X: np.ndarray, maps: NativeMapTable, map_index: int) -> Scores:
        """The call on the loop's thread; its cost per row (not the thread's round trip, which
        is mostly waiting) is what decides whether a lone request runs here."""
        t0 = time.perf_counter()
        out = self.model.score(X, maps, map_index)
        per_row = (time.perf_counter() - t0) / len(X)
        self.seconds_per_row = per_row if not self.seconds_per_row else 0.9 * self.seconds_per_row + 0.1 * per_row
        return out


def _map_index(items: list[_Item]) -> int | np.ndarray:
    """One map for the whole batch when its items share one (the steady state), else one per row."""
    first = items[0].map_index
    if all(item.map_index == first for item in items):
        return first
    return np.repeat(np.array([item.map_index for item in items], dtype=np.int64), [len(item.X) for item in items])
