"""The little ASGI plumbing the app needs: reading a bounded body in bounded time, and
sending a response."""

from __future__ import annotations

import asyncio
import itertools
import os
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec

from .errors import Headers, HTTPError
from .schemas import usable_request_id

JSON = b"application/json"
Response = tuple[int, bytes, bytes, Headers | None]  # status, body, content type, extra headers
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
_ENCODER = msgspec.json.Encoder()


class BodyDeadlines:
    """Ends body reads that outlast ``seconds`` (a client trickling its body, or sending headers
    and then nothing), with a 408.  One timer for every read in flight, ticking every
    ``tick`` seconds: a timer per request (asyncio.timeout) cost ~4 us of a ~50 us request,
    registering here ~0.3 us (measured in-process, uvloop).  A read may so run up to one
    tick past its deadline."""

    def __init__(self, seconds: float, tick: float = 0.5):
        self.seconds = seconds
        self.tick = min(tick, seconds)
        self._reading: dict[asyncio.Task, float] = {}  # task -> deadline (loop time)
        self._expired: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """On the serving loop (the app's lifespan start-up)."""
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(self.tick, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        for task, deadline in list(self._reading.items()):
            if now > deadline and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._timer = self._loop.call_later(self.tick, self._sweep)

    def enter(self) -> asyncio.Task | None:
        if self._loop is None:  # not started (an app driven without its lifespan): no deadline
            return None
        task = asyncio.current_task()
        if task is not None:
            self._reading[task] = self._loop.time() + self.seconds
        return task

    def leave(self, task: asyncio.Task | None) -> None:
        if task is not None:
            self._reading.pop(task, None)

    def expired(self, task: asyncio.Task | None) -> bool:
        """Whether ``task`` was cancelled by its deadline (and so the cancellation is ours)."""
        if task is None or task not in self._expired:
            return False
        self._expired.discard(task)
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+ counts cancellations; 3.10 does not
        if uncancel is not None:
            uncancel()
        return True


NO_DEADLINES = BodyDeadlines(1.0)  # never started: reads without a deadline


# Generated request ids: 16 hex digits, a random 40-bit prefix and a 24-bit counter, the prefix
# drawn again per process (a forked worker too) and every 2**24 ids.  Unique with overwhelming
# odds (event ids generated from them rely on that) -- more so than 64 random bits a request --
# at ~0.4 us a request where os.urandom took ~0.6 (timeit, in-process).
_ID_BLOCK = 1 << 24


def _new_block() -> tuple[str, Iterator[int]]:
    return os.urandom(5).hex(), itertools.count()


_ids = _new_block()
os.register_at_fork(after_in_child=lambda: globals().update(_ids=_new_block()))


def _new_request_id() -> str:
    global _ids
    prefix, counter = _ids  # one tuple: a prefix is never paired with another block's counter
    n = next(counter)
    while n >= _ID_BLOCK:
        _ids = _new_block()
        prefix, counter = _ids
        n = next(counter)
    return f"{prefix}{n:06x}"


class Request:
    __slots__ = ("_id", "deadlines", "headers", "key_id", "lane", "max_body", "method", "path", "receive", "scope")

    def __init__(self, scope: dict[str, Any], receive: Receive, max_body: int, deadlines: BodyDeadlines = NO_DEADLINES):
        self.scope = scope
        self.receive = receive
        self.path: str = scope["path"]
        self.method: str = scope["method"]
        self.headers: dict[bytes, bytes] = dict(scope["headers"])  # ASGI lowercases names
        self.max_body = max_body
        self.deadlines = deadlines
        # who asked, and which lane served it: for the access log and error lines
        self.key_id: str | None = None
        self.lane: Any = None
        self._id: str | None = None

    @property
    def id(self) -> str:
        """The request's id for logs and the score log: the client's X-Request-ID (printable
        ASCII without spaces, at most 128 characters), else a new one (see _new_request_id); the
        same for every line about this request."""
        if self._id is None:
            given = self.headers.get(b"x-request-id", b"").decode("latin-1")  # any bytes decode; the rule checks
            self._id = given if usable_request_id(given) else _new_request_id()
        return self._id

    async def body(self) -> bytes:
        """The request body, bounded by max_body.  It is complete once content-length bytes have
        arrived: Granian marks its first chunk more_body=True whatever its size, and the receive
        that would say there is no more is another hand-off between Granian's thread and the
        loop (bench/loadgen.c at 8,000 req/s: p50 1.6 ms with it, 0.8 ms without)."""
        declared = self.headers.get(b"content-length")
        length = -1  # unknown (chunked): read until more_body is false
        if declared is not None:
            if not declared.isdigit() or len(declared) > 18:
                raise HTTPError(400, "content-length: not a number", "content-length")
            length = int(declared)
            if length > self.max_body:
                raise HTTPError(413, f"request body of {length} bytes exceeds the limit of {self.max_body}")
        chunks, size = [], 0
        task = self.deadlines.enter()
        try:
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    raise ConnectionAbortedError("client went away")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:  # chunked uploads have no content-length to check up front
                    raise HTTPError(413, f"request body exceeds the limit of {self.max_body} bytes")
                chunks.append(chunk)
                if size == length or not message.get("more_body", False):
                    break
        except asyncio.CancelledError:
            if not self.deadlines.expired(task):
                raise
            raise HTTPError(
                408,
                f"the request body did not arrive within {self.deadlines.seconds:g} s ({size} bytes came)",
                "body",
                [(b"connection", b"close")],
            ) from None
        finally:
            self.deadlines.leave(task)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = self.headers.get(b"content-encoding")
        return body if encoding in (None, b"identity") else self._decompress(body, encoding)

    def _decompress(self, body: bytes, encoding: bytes) -> bytes:
        """gzip/deflate request bodies (tritonclient can send them), bounded like plain ones."""
        wbits = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}.get(encoding.strip().lower())
        if wbits is None:
            raise HTTPError(
                415,
                f"content-encoding {encoding.decode('latin-1')!r} is not supported (gzip, deflate or identity)",
                "content-encoding",
            )
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, self.max_body + 1)
        except zlib.error as exc:
            raise HTTPError(
                400, f"content-encoding {encoding.decode('latin-1')}: corrupt body ({exc})", "content-encoding"
            ) from None
        if len(out) > self.max_body or inflater.unconsumed_tail:
            raise HTTPError(413, f"decompressed request body exceeds the limit of {self.max_body} bytes")
        return out


async def send(
    send_fn: Send, status: int, body: bytes, content_type: bytes = JSON, headers: Headers | None = None
) -> None:
    raw_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        raw_headers.extend(headers)
    await send_fn({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send_fn({"type": "http.response.body", "body": body})


def encode(obj: Any) -> bytes:
    return _ENCODER.encode(obj)


def json_response(obj: Any) -> Response:
    return 200, _ENCODER.encode(obj), JSON, None
