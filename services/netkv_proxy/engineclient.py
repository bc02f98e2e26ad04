"""A lean HTTP/1.1 client for the proxy's two engine legs (``POST`` a JSON body; read a
JSON answer or an SSE stream), on an asyncio :class:`~asyncio.Protocol` with the response
parsed by ``httptools`` (llhttp, the parser uvicorn uses), and a keep-alive connection pool
per engine (the connection, its parser and its bounds: :mod:`netkv_proxy.engineconn`).

Why not aiohttp's client: at a few hundred requests per second its per-request machinery
(the request and response objects, the header multidicts, the stream reader, the tracing
hooks, the connector's bookkeeping) was ~45% of the proxy's CPU per request, on a path
that sends one known method to one known path with three headers. This client builds the
request head from bytes prepared once per engine and per request, writes head and body in one
``write``, and hands back the status, the few headers and the body.

Bounded everything: the connect time (``connect_timeout_s``), the gap between two reads of a
response (``read_timeout_s``, per exchange; the prefill leg bounds its whole exchange
itself), the response head (``MAX_HEAD_BYTES``, ``MAX_HEADERS``), a whole body read into
memory (``max_body_bytes``), the connections per engine (``max_connections``; callers wait
for one beyond it) and the idle ones kept (``max_idle``, none older than ``idle_s``).

Connections: a connection goes back to its pool only when its response was read to the end,
the engine allows keep-alive and nothing else arrived; anything else (an error, a timeout, a
caller that was cancelled or stopped reading, e.g. when the client went away) closes it, so
the engine sees the close and stops. A reused connection that the engine had closed while it
was idle (the keep-alive race) fails before any byte of an answer: the request is sent once
more on a new connection (it cannot have been processed). Responses are content-length,
chunked, or delimited by the close.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from urllib.parse import urlsplit

from netkv_proxy.engineconn import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    Connection,
    EngineConnectError,
    EngineError,
    header_block,
)

__all__ = ["MAX_HEADERS", "MAX_HEAD_BYTES", "EngineConnectError", "EngineError", "EnginePool",
           "Response", "header_block"]


class Response:
    """An engine's answer: ``status``, ``headers`` (lower-case names), the body by
    :meth:`read` or :meth:`chunk`. Use as ``async with pool.post(...) as resp``."""

    __slots__ = (
        "_body",
        "_conn",
        "_deadline_s",
        "_head",
        "_max_body",
        "_pool",
        "_timeout",
        "headers",
        "status",
    )

    def __init__(self, pool: EnginePool, head: bytes, body: bytes, *,
                 read_timeout: float | None, max_body: int, timeout: float | None) -> None:
        self._pool, self._head, self._body = pool, head, body
        self._timeout, self._max_body, self._deadline_s = read_timeout, max_body, timeout
        self._conn: Connection | None = None
        self.status = 0
        self.headers: dict[str, str] = {}

    async def __aenter__(self) -> Response:
        pool = self._pool
        deadline = None if self._deadline_s is None else pool.loop.time() + self._deadline_s
        for attempt in range(2):
            conn = await pool.acquire(deadline)
            self._conn = conn
            conn._reset(self._max_body, self._timeout, deadline)
            conn.last_read = pool.loop.time()
            assert conn.transport is not None
            conn.transport.write(self._head + self._body)
            try:
                while not conn.status:
                    await conn.wait()
            except EngineError:
                if attempt == 0 and conn.reused and not conn.got_bytes:
                    self._release()  # closed while idle (the keep-alive race): once more
                    continue
                self._release()
                raise
            except BaseException:
                self._release()
                raise
            self.status, self.headers = conn.status, conn.headers
            return self
        raise AssertionError("unreachable")

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)

    async def read(self) -> bytes:
        """The whole body (at most ``max_body`` bytes)."""
        conn = self._conn
        assert conn is not None, "read inside the async with block"
        while not conn.complete:
            await conn.wait()
        return conn.take() if conn.chunks else b""

    async def chunk(self) -> bytes | None:
        """The body as it arrives: what has arrived since the last call, joined (None at
        the end). A coroutine, not an async generator: a stream left unfinished (the client
        went away) leaves no generator for the loop to finalise."""
        conn = self._conn
        assert conn is not None, "read inside the async with block"
        while True:
            if conn.chunks:
                return conn.take()
            if conn.complete:
                return None
            await conn.wait()


class EnginePool:
    """Keep-alive connections to one engine (``base``: ``http(s)://host:port``)."""

    def __init__(self, base: str, *, connect_timeout_s: float, max_connections: int,
                 max_idle: int = 256, idle_s: float = 15.0) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected http(s)://HOST:PORT, got {base!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() \
            if parts.scheme == "https" else None
        self.name = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self._host_line = b"Host: " + parts.netloc.encode("idna") + b"\r\n"
        self.connect_timeout_s = connect_timeout_s
        self.max_connections, self.max_idle, self.idle_s = max_connections, max_idle, idle_s
        self.loop = asyncio.get_running_loop()
        self.idle: collections.deque[Connection] = collections.deque()
        self.busy: set[Connection] = set()
        self.connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._heads: dict[str, bytes] = {}
        self.closed = False

    def post(self, path: str, body: bytes, extra: bytes = b"", *,
             read_timeout: float | None = None, max_body: int = 0,
             timeout: float | None = None) -> Response:
        """``POST path`` with a JSON ``body`` and ``extra`` header lines (see
        :func:`header_block`); ``async with`` the result. ``read_timeout``: the longest gap
        between two reads; ``timeout``: the whole exchange, from here to the end of the
        answer (waiting for a connection included); either raises TimeoutError."""
        start = self._heads.get(path)
        if start is None:
            start = self._heads[path] = (b"POST " + (self.prefix + path).encode() +
                                         b" HTTP/1.1\r\n" + self._host_line +
                                         b"Content-Type: application/json\r\n")
        head = b"%s%sContent-Length: %d\r\n\r\n" % (start, extra, len(body))
        return Response(self, head, body, read_timeout=read_timeout, max_body=max_body,
                        timeout=timeout)

    @property
    def open(self) -> int:
        return len(self.idle) + len(self.busy) + self.connecting

    async def acquire(self, deadline: float | None = None) -> Connection:
        """A kept connection (no wait), else a new one once under ``max_connections``
        (the wait and the connect bounded by ``deadline``, loop time, when given)."""
        if self.closed:
            raise EngineError(f"the pool of {self.name} is closed")
        idle, now = self.idle, time.monotonic()
        while idle and now - idle[0].idle_since > self.idle_s:  # the oldest ones first
            idle.popleft().close()
        while idle:
            conn = idle.pop()  # the most recently used: the warmest
            if not conn.closed and conn.transport is not None \
                    and not conn.transport.is_closing():
                conn.reused, conn.idle_since = True, 0.0
                self.busy.add(conn)
                return conn
        async with asyncio.timeout_at(deadline):
            return await self._open()

    async def _open(self) -> Connection:
        while self.open >= self.max_connections:
            w = self.loop.create_future()
            self._waiters.append(w)
            try:
                await w
            except BaseException:
                if w in self._waiters:
                    self._waiters.remove(w)
                elif w.done() and not w.cancelled():
                    self._notify()  # woken, then cancelled: pass the turn on
                raise
            if self.idle:
                return await self.acquire()
        self.connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s) as limit:
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except TimeoutError:
            if not limit.expired():
                raise  # the caller's deadline, not the connect time
            raise EngineConnectError(f"no connection to {self.name} within "
                                     f"{self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise EngineConnectError(f"cannot connect to {self.name}: "
                                     f"{type(exc).__name__}: {exc}") from None
        finally:
            self.connecting -= 1
            self._notify()
        self.busy.add(conn)
        return conn

    def release(self, conn: Connection) -> None:
        self.busy.discard(conn)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        conn.waiter = None
        if (conn.complete and conn.keep and not conn.closed and not self.closed
                and conn.error is None and not conn.chunks
                and len(self.idle) < self.max_idle):
            conn.idle_since = time.monotonic()
            conn.reused = False
            conn.status = 0
            self.idle.append(conn)
        else:
            conn.close()
        self._notify()

    def _lost(self, conn: Connection) -> None:
        if conn.idle_since:
            with contextlib.suppress(ValueError):
                self.idle.remove(conn)
        self._notify()

    def _notify(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def close(self) -> None:
        self.closed = True
        for conn in [*self.idle, *self.busy]:
            conn.close()
        self.idle.clear()
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(EngineError(f"the pool of {self.name} is closed"))
