"""Native model calls on one worker thread, awaited on the running event loop.

The thread (``NativeWorker``) never takes the GIL; it signals completions on an
eventfd the loop watches, so a hand-off costs the loop a few microseconds and no
GIL hand-over."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import numpy as np

from ._worker import NativeWorker

if TYPE_CHECKING:
    from ._library import NativeMapTable
    from .artifact import CompiledModel
    from .scores import Scores


class ModelThread:
    """Model calls on a native thread, each answered through an asyncio future."""

    def __init__(self) -> None:
        self._worker: NativeWorker | None = None
        # call id -> (future, model, scores, what the call reads): alive until it completes
        self._calls: dict[int, tuple[asyncio.Future[Scores], CompiledModel, Scores, Any]] = {}

    def score_async(
        self, model: CompiledModel, X: np.ndarray, maps: NativeMapTable, map_index: int | np.ndarray = 0
    ) -> asyncio.Future[Scores]:
        """What ``model.score`` computes, on the thread."""
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._worker = NativeWorker()
            loop.add_reader(self._worker.fileno(), self._completed)
        call, scores, keep = model.submit(self._worker, X, maps, map_index)
        future: asyncio.Future[Scores] = loop.create_future()
        self._calls[call] = (future, model, scores, keep)
        return future

    def _completed(self) -> None:
        assert self._worker is not None
        for call, rc, seconds in self._worker.completed():
            future, model, scores, _ = self._calls.pop(call)
            if future.done():  # the caller went away
                continue
            error = model.failure(rc, len(scores))
            if error is None:
                scores.seconds = seconds
                future.set_result(scores)
            else:
                future.set_exception(error)

    def close(self) -> None:
        """Finish calls in flight, then stop the thread (call on the loop's thread)."""
        if self._worker is not None:
            asyncio.get_running_loop().remove_reader(self._worker.fileno())
            self._worker.close()
            self._completed()
            self._worker = None
