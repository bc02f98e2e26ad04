"""Serving an aiohttp app with limits an idle or slow flood cannot get past.

aiohttp alone has no header-read deadline and no connection cap (issue 9: 1,100 idle sockets
under a 1,024 file limit took the scheduler down; a byte-a-second slowloris stayed open past
40 s). :func:`serving` adds, per :class:`HttpLimits`:

* a connection cap (``max_connections``, kept below the process's file limit): at the cap a
  new connection evicts the oldest one that has not yet sent a complete request (idle and
  slowloris sockets go first); if every connection is busy, the new one is closed;
* a header deadline (``header_timeout_s``): a connection that has not delivered a complete
  request head within it is closed;
* aiohttp's own knobs: ``keepalive_timeout`` (idle between requests; also armed at connect),
  ``max_line_size`` and ``max_field_size`` (request line and header sizes), a listen backlog;
* body deadline and size: :func:`netkv.http.bodies.read_body` (``body_timeout_s``) and the
  app's ``client_max_size`` with :func:`netkv.http.middlewares.json_only`.

The connection guard is a thin protocol wrapper around aiohttp's own request handler, plus a
request factory hook (``web.Server.request_factory``) that marks a connection busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, cast

from aiohttp import web
from pydantic import BaseModel

from netkv.config import Positive
from netkv.http.ratelimit import RateLimitedLog, limit_loop_errors

_log = RateLimitedLog(__name__)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Server limits (seconds, bytes, counts); the defaults suit a loopback control plane."""

    max_connections: int = 4096
    header_timeout_s: float = 5.0
    keepalive_timeout_s: float = 15.0
    body_timeout_s: float = 10.0
    max_line_size: int = 8190
    max_field_size: int = 8190
    backlog: int = 128
    shutdown_timeout_s: float = 3.0


class HttpLimitsSettings(BaseModel):
    """The client-side limits as settings fields, one definition for every server's settings
    (the scheduler's and the proxy's mix it in; same names, defaults and errors for both).

    A head must arrive within ``header_timeout_s`` of connecting, a body within
    ``body_timeout_s``; an idle keep-alive connection is closed after
    ``keepalive_timeout_s``; the field named by ``CONNECTION_CAP`` caps the open client
    connections (idle and slow ones are evicted first). The proxy's ``max_connections`` is its
    upstream pool, so its cap is ``max_client_connections``.
    """

    CONNECTION_CAP: ClassVar[str] = "max_connections"
    header_timeout_s: Positive = 5.0
    body_timeout_s: Positive = 10.0
    keepalive_timeout_s: Positive = 15.0

    def http_limits(self) -> HttpLimits:
        return HttpLimits(max_connections=int(getattr(self, self.CONNECTION_CAP)),
                          header_timeout_s=self.header_timeout_s,
                          keepalive_timeout_s=self.keepalive_timeout_s,
                          body_timeout_s=self.body_timeout_s)


def raise_file_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE toward ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


Conn = TypeVar("Conn")


class ConnectionCap(Generic[Conn]):
    """The connection cap both fronts enforce (this module's aiohttp guard and
    :class:`netkv.http.h1.H1Guard`): at the cap a new connection evicts the oldest one in
    ``waiting`` (idle, or no complete request head yet); if none waits, it is refused. Also
    the counters (evicted, refused, header deadlines) each front's metrics read."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        # One accept burst takes up to ``backlog`` descriptors before the guard can close
        # any (and closes land one loop turn later), so the cap leaves twice that, plus room
        # for the listening socket, Redis/MQTT clients, scrapes and log files.
        reserve = 2 * limits.backlog + 128
        soft = raise_file_limit(limits.max_connections + reserve)
        self.cap = max(16, min(limits.max_connections, soft - reserve))
        self.open: dict[Conn, None] = {}
        self.waiting: OrderedDict[Conn, None] = OrderedDict()
        self.evicted_total = 0
        self.refused_total = 0
        self.header_timeouts_total = 0

    def evict(self, conn: Conn) -> None:
        """Close ``conn`` to make room (each front closes its own kind of connection)."""
        raise NotImplementedError

    def admit(self, conn: Conn) -> bool:
        if len(self.open) >= self.cap:
            if self.waiting:
                oldest = next(iter(self.waiting))
                self.evicted_total += 1
                self.evict(oldest)
            else:
                self.refused_total += 1
                _log.warning("connection refused: at the connection cap", cap=self.cap)
                return False
        self.open[conn] = None
        self.waiting[conn] = None
        return True

    def forget(self, conn: Conn) -> None:
        self.open.pop(conn, None)
        self.waiting.pop(conn, None)


class ConnectionGuard(ConnectionCap["_Guarded"]):
    """Counts connections, enforces the cap and the header deadline."""

    def __init__(self, server: web.Server, limits: HttpLimits) -> None:
        super().__init__(limits)
        self.server = server
        self.by_handler: dict[Any, _Guarded] = {}
        inner = server.request_factory

        def request_factory(message: Any, payload: Any, protocol: Any, writer: Any,
                            task: Any) -> web.BaseRequest:
            conn = self.by_handler.get(protocol)
            if conn is not None:
                conn.got_request()
            return inner(message, payload, protocol, writer, task)
        server.request_factory = request_factory

    def __call__(self) -> _Guarded:
        return _Guarded(self, self.server())

    def evict(self, conn: _Guarded) -> None:
        conn.close()

    def admit(self, conn: _Guarded) -> bool:
        if not super().admit(conn):
            return False
        self.by_handler[conn.inner] = conn
        return True

    def forget(self, conn: _Guarded) -> None:
        super().forget(conn)
        self.by_handler.pop(conn.inner, None)


class _Guarded(asyncio.Protocol):
    """aiohttp's RequestHandler behind the guard (every call is passed through)."""

    def __init__(self, guard: ConnectionGuard, inner: Any) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not a subclass of asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        if not self.guard.admit(self):
            self.transport.abort()
            return
        self._admitted = True
        self.inner.connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.guard.limits.header_timeout_s, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self in self.guard.waiting:
            self.guard.header_timeouts_total += 1
            self.close()

    def got_request(self) -> None:
        """A complete request head arrived: the connection is busy, not evictable."""
        self.guard.waiting.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def close(self) -> None:
        self.guard.forget(self)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        if self._admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._admitted:
            self.inner.connection_lost(exc)


@dataclass
class Served:
    """A running server: its URLs, port and connection guard (for metrics and tests)."""

    urls: list[str]
    port: int
    guard: ConnectionGuard
    runner: web.AppRunner


def listening(server: asyncio.Server, port: int) -> tuple[list[str], int]:
    """The URLs a listening ``server`` answers on, and its port (``port`` if it has no
    socket)."""
    sockets = server.sockets or ()
    addrs = [s.getsockname() for s in sockets]
    urls = [f"http://[{a[0]}]:{a[1]}" if s.family == socket.AF_INET6
            else f"http://{a[0]}:{a[1]}" for s, a in zip(sockets, addrs, strict=True)]
    return urls, int(addrs[0][1]) if addrs else port


@contextlib.asynccontextmanager
async def serving(app: web.Application, host: str, port: int,
                  limits: HttpLimits = HttpLimits(),
                  on_start: Callable[[Served], None] | None = None, *,
                  handler_cancellation: bool = False,
                  lingering_time: float = 10.0) -> AsyncIterator[Served]:
    """Serve ``app`` on ``host:port`` (0: any free port) until the block ends.

    ``handler_cancellation``: cancel a handler when its client goes away (aiohttp's flag;
    the proxy needs it to release a booking and cancel both legs). ``lingering_time``: how
    long aiohttp keeps reading an unread body after the answer (0: close at once, so a
    trickled body answered 408 does not hold the connection)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           handler_cancellation=handler_cancellation,
                           lingering_time=lingering_time,
                           keepalive_timeout=limits.keepalive_timeout_s,
                           max_line_size=limits.max_line_size,
                           max_field_size=limits.max_field_size,
                           shutdown_timeout=limits.shutdown_timeout_s)
    await runner.setup()
    try:
        assert runner.server is not None
        guard = ConnectionGuard(runner.server, limits)
        loop = asyncio.get_running_loop()
        limit_loop_errors(loop)
        server = await loop.create_server(guard, host, port, backlog=limits.backlog,
                                          reuse_address=True)
        try:
            urls, bound = listening(server, port)
            served = Served(urls, bound, guard, runner)
            if on_start is not None:
                on_start(served)
            yield served
        finally:
            server.close()
            for conn in list(guard.open):
                conn.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limits.shutdown_timeout_s):
                    await server.wait_closed()
    finally:
        await runner.cleanup()
