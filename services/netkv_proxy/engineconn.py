"""One keep-alive HTTP/1.1 connection to an engine, for :mod:`netkv_proxy.engineclient`: an
asyncio :class:`~asyncio.Protocol` whose answers are parsed by ``httptools`` (llhttp), with the
bounds of one exchange (head size and header count, body size, the read gap and the whole
exchange's deadline) and flow control on a stream (reading paused while more than
``STREAM_HIGH_WATER`` bytes wait for the reader). The request side is the pool's; what a
failure raises is here (:class:`EngineError`, :class:`EngineConnectError`).
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, cast

import httptools

if TYPE_CHECKING:
    from netkv_proxy.engineclient import EnginePool

MAX_HEAD_BYTES = 64 << 10
MAX_HEADERS = 100
STREAM_HIGH_WATER = 256 << 10  # buffered bytes of a stream before reading is paused


class EngineError(Exception):
    """The exchange with an engine failed (closed, malformed or oversized answer)."""


class EngineConnectError(EngineError):
    """No connection to the engine (refused, unreachable, or not within the connect time)."""


def _header_value(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")  # the bytes aiohttp's server decoded
    if b"\r" in data or b"\n" in data:
        raise ValueError("header value with CR or LF")
    return data


def header_block(headers: dict[str, str]) -> bytes:
    """``Name: value\\r\\n`` lines for extra request headers (built once per request)."""
    return b"".join(_header_value(k) + b": " + _header_value(v) + b"\r\n"
                    for k, v in headers.items())


class Connection(asyncio.Protocol):
    """One connection to an engine; one exchange at a time."""

    __slots__ = (
        "buffered",
        "chunks",
        "closed",
        "complete",
        "deadline",
        "error",
        "got_bytes",
        "head_bytes",
        "head_size",
        "headers",
        "idle_since",
        "keep",
        "last_read",
        "max_body",
        "parser",
        "paused",
        "pool",
        "read_timeout",
        "reused",
        "status",
        "timer",
        "transport",
        "waiter",
    )

    def __init__(self, pool: EnginePool) -> None:  # the pool it belongs to
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reused = False
        self.closed = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self._reset(0, None)

    def _reset(self, max_body: int, read_timeout: float | None,
               deadline: float | None = None) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_bytes = 0  # bytes received before the head was complete
        self.head_size = 0  # bytes of the header lines parsed
        self.got_bytes = False
        self.complete = False  # the response was parsed to its end
        self.keep = False  # ... and the connection may carry another
        self.error: BaseException | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.max_body = max_body
        self.read_timeout = read_timeout
        self.deadline = deadline  # loop time by which the whole exchange must be done
        self.last_read = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not a subclass of asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.idle_since or self.complete:  # bytes nobody asked for: not reusable
            self.close()
            return
        self.got_bytes = True
        self.last_read = self.pool.loop.time()
        if not self.status:  # the head is not complete: bound what the parser holds
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES + (64 << 10):  # a body may have begun
                self._fail(self._bound(f"a head over {MAX_HEAD_BYTES} bytes"))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(EngineError(f"{self.pool.name} tried to upgrade the connection"))
        except httptools.HttpParserError as exc:
            # a bound a callback found (the parser wraps what its callbacks raise)
            self._fail(self.error or EngineError(f"malformed answer from {self.pool.name}: "
                                                 f"{exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._lost(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.complete:
            return
        if self.status and not self._delimited():
            # no length and not chunked: the close ends the body
            self.complete = True
            self._wake()
            return
        reason = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        self._fail(EngineError(f"{self.pool.name} closed the connection before the end of "
                               f"its answer{reason}"))

    def pause_writing(self) -> None:  # request bodies are small and written at once
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ------------------------------------------------------------
    def _bound(self, what: str) -> EngineError:
        self.error = exc = EngineError(f"{self.pool.name} answered {what}")
        return exc

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD_BYTES or len(self.headers) >= MAX_HEADERS:
            raise self._bound(f"a head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers")
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.max_body and self.buffered > self.max_body:
            raise self._bound(f"a body over {self.max_body} bytes")
        if self.buffered > STREAM_HIGH_WATER and not self.paused and self.transport:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep = self.parser.should_keep_alive()
        self._wake()

    # -- helpers ------------------------------------------------------------------------
    def _delimited(self) -> bool:
        h = self.headers
        return "content-length" in h or "chunked" in h.get("transfer-encoding", "")

    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.keep = False
        self.close()
        self._wake()

    def close(self) -> None:
        self.keep = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    async def wait(self) -> None:
        """Until something arrives (head, body, the end, an error) or the read times out."""
        if self.error is not None:
            raise self.error
        if self.closed:  # lost before this exchange began
            raise EngineError(f"{self.pool.name} closed the connection")
        loop = self.pool.loop
        self.waiter = w = loop.create_future()
        if self.timer is None and (self.read_timeout is not None or self.deadline is not None):
            self.timer = loop.call_at(self._due(), self._check_timeout)
        await w
        if self.error is not None:
            raise self.error

    def _due(self) -> float:
        due = float("inf") if self.read_timeout is None else self.last_read + self.read_timeout
        return due if self.deadline is None else min(due, self.deadline)

    def _check_timeout(self) -> None:
        self.timer = None
        if self.complete or self.error is not None:
            return
        due = self._due()
        loop = self.pool.loop
        if loop.time() < due:
            self.timer = loop.call_at(due, self._check_timeout)
            return
        self._fail(TimeoutError(f"{self.pool.name}: no complete answer in time" if
                                self.deadline is not None and due >= self.deadline else
                                f"{self.pool.name}: nothing read for {self.read_timeout:g} s"))

    def take(self) -> bytes:
        """Everything buffered so far (resumes a paused stream)."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data
