"""A lean HTTP/1.1 server on an asyncio Protocol and httptools (llhttp), for the P/D proxy's
front, with the limits :func:`netkv.http.server.serving` gives an aiohttp app.

Why: the proxy's request path is two engine round trips and a decision; aiohttp's server (its
request handler, request and response objects, router and middleware chain) cost about as
much CPU per request as all of that. This server does only what the proxy needs, and keeps
every guarantee of the aiohttp front:

* limits (:class:`~netkv.http.server.HttpLimits`): a connection cap (at the cap a new
  connection evicts the oldest one that is idle or has not yet sent a complete request head;
  if every connection is busy the new one is closed), a header deadline (``header_timeout_s``
  from connecting, and from the first byte of each later head), a keep-alive timeout (idle
  between requests), request line and header field sizes (``max_line_size``,
  ``max_field_size``; at most ``MAX_HEADERS`` fields), a body size (``max_body``: a declared
  ``Content-Length`` above it is a 413 before any byte is read; a chunked body is cut off at
  it) and the body deadline, which the handler applies around :meth:`H1Request.read`;
* ``HEAD`` answered by the ``GET`` route without its body (as aiohttp's ``add_get``);
* keep-alive and pipelining: requests on one connection are answered one at a time, in order
  (a pipelined request waits for the one before it; reading pauses past ``MAX_PIPELINED``);
  an answer given before its request's body was read closes the connection (as aiohttp's
  ``lingering_time=0``);
* streaming (:meth:`H1Request.stream`): chunked transfer encoding, one chunk per write, with
  backpressure (a write waits while the transport has paused the protocol);
* a client that goes away cancels its request's handler (as aiohttp's
  ``handler_cancellation=True``), so the handler's ``finally`` blocks release what it holds.

Handlers answer with aiohttp ``web.Response`` objects (only their status, reason, headers
and bytes body are read), so the same handlers run on either front; an ``HTTPException``
raised by a handler (or by :meth:`H1Request.read` for an oversized body) goes to the
``errors`` wrapper given to :func:`serving`. Protocol errors (a malformed request, a line or
field too long) are answered 400/413/431 in the shape ``bad_request`` makes, then closed.

Size (~550 lines, one concept): the connection protocol, its request and stream objects and
the connection guard share one connection's private state (timers, pause, pipelining queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import cast

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from netkv.http.ratelimit import RateLimitedLog, limit_loop_errors
from netkv.http.server import ConnectionCap, HttpLimits, listening

_log = RateLimitedLog(__name__)

MAX_HEADERS = 128
MAX_PIPELINED = 16
_DEFAULT_LIMITS = HttpLimits()

Answer = web.StreamResponse
Handler = Callable[["H1Request"], Awaitable["Answer | H1Stream"]]
Errors = Callable[["H1Request", Handler], Awaitable["Answer | H1Stream"]]
BadRequest = Callable[[int, str], web.Response]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 413: "Request Entity Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}
_date = ["", 0]  # the Date header, made once a second


def _http_date() -> str:
    now = int(time.time())
    if now != _date[1]:
        _date[0], _date[1] = formatdate(now, usegmt=True), now
    return cast(str, _date[0])


def _plain_bad_request(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message)


class _ProtocolError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class H1Request:
    """One request: ``method``, ``path``, ``query_string``, ``headers`` (case-insensitive),
    ``version``; the body through :meth:`read`; a streamed answer through :meth:`stream`."""

    __slots__ = ("_body", "_conn", "_done", "_parts", "_size", "expects_continue", "headers",
                 "keep_alive", "malformed", "method", "path", "query_string", "streamed",
                 "too_large", "version")

    def __init__(self, conn: _Connection, method: str, url: bytes, *,
                 headers: CIMultiDictProxy[str], version: str, keep_alive: bool) -> None:
        self._conn = conn
        path, _, query = url.partition(b"?")
        self.method, self.path = method, path.decode("latin-1")
        self.query_string = query.decode("latin-1")
        self.headers, self.version, self.keep_alive = headers, version, keep_alive
        self._parts: list[bytes] = []
        self._size = 0
        self._body: bytes | None = None
        self._done: asyncio.Future[None] | None = None
        self.too_large = False
        self.expects_continue = False
        self.streamed = False  # a streamed answer was started
        self.malformed: str | None = None  # its body broke the protocol (read raises 400)

    @property
    def content(self) -> H1Request:
        """``request.content.is_eof()`` as on aiohttp's request (a property, not an
        attribute: a request referring to itself would be a cycle, freed only by the
        collector, and one collector pass per ~700 requests)."""
        return self

    def is_eof(self) -> bool:
        """The whole body has arrived."""
        return self._body is not None

    async def read(self) -> bytes:
        """The body (raises ``HTTPRequestEntityTooLarge`` past the server's ``max_body``)."""
        if self._body is None:
            if self._done is None:
                self._done = asyncio.get_running_loop().create_future()
            await self._done
        if self.malformed is not None:
            raise web.HTTPBadRequest(text=self.malformed)
        if self.too_large:
            raise web.HTTPRequestEntityTooLarge(max_size=self._conn.server.max_body,
                                                actual_size=self._size)
        assert self._body is not None
        return self._body

    async def stream(self, status: int, headers: dict[str, str]) -> H1Stream:
        """Start a streamed answer (chunked); write chunks to it, then ``write_eof()``."""
        out = H1Stream(self._conn, self)
        self.streamed = True
        await out.start(status, headers)
        return out

    # -- fed by the connection --------------------------------------------------------------
    def _body_part(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._conn.server.max_body:
            self.too_large = True
            self._parts.clear()
        elif not self.too_large:
            self._parts.append(data)

    def _complete(self) -> None:
        if self._body is not None:  # already complete (declared too large)
            return
        self._body = b"".join(self._parts) if len(self._parts) != 1 else self._parts[0]
        self._parts = []
        if self._done is not None and not self._done.done():
            self._done.set_result(None)


class H1Stream:
    """A streamed (chunked) answer: :meth:`write` each chunk, then :meth:`write_eof`."""

    def __init__(self, conn: _Connection, request: H1Request) -> None:
        self._conn, self._request = conn, request
        self._chunked = request.version != "1.0"
        self.done = False

    async def start(self, status: int, headers: dict[str, str]) -> None:
        conn = self._conn
        close = not self._chunked or not conn.reusable(self._request)
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
                f"Date: {_http_date()}\r\n"]
        head.extend(f"{k}: {v}\r\n" for k, v in headers.items())
        head.append("Transfer-Encoding: chunked\r\n" if self._chunked else "")
        head.append("Connection: close\r\n\r\n" if close else "\r\n")
        if close:
            conn.close_after = True
        await conn.write("".join(head).encode("latin-1"))

    async def write(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            await self._conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            await self._conn.write(data)

    async def write_eof(self) -> None:
        if not self.done:
            self.done = True
            if self._chunked:
                await self._conn.write(b"0\r\n\r\n")


class H1Guard(ConnectionCap["_Connection"]):
    """The connection cap and its counters for the h1 front (:class:`ConnectionCap`)."""

    def evict(self, conn: _Connection) -> None:
        conn.abort()


class _Server:
    def __init__(self, routes: dict[tuple[str, str], Handler], limits: HttpLimits,
                 max_body: int, errors: Errors | None, bad_request: BadRequest) -> None:
        self.routes, self.limits, self.max_body = routes, limits, max_body
        self.errors, self.bad_request = errors, bad_request
        self.paths = {path for _, path in routes}
        self.guard = H1Guard(limits)

    def __call__(self) -> _Connection:
        return _Connection(self)

    async def dispatch(self, request: H1Request) -> Answer | H1Stream:
        method = "GET" if request.method == "HEAD" else request.method  # as aiohttp's add_get
        handler = self.routes.get((method, request.path))
        if handler is None:
            handler = _not_found if request.path not in self.paths else _not_allowed
        if self.errors is not None:
            return await self.errors(request, handler)
        return await handler(request)


async def _not_found(request: H1Request) -> Answer:
    raise web.HTTPNotFound()


async def _not_allowed(request: H1Request) -> Answer:
    raise web.HTTPMethodNotAllowed(request.method, [])


class _Connection(asyncio.Protocol):
    """One client connection: parses with httptools, answers its requests in order."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_is_header = False
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0
        self._in_head = False
        self._parsing: H1Request | None = None  # the request whose bytes are arriving
        self._pending: deque[H1Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused_reading = False
        self.paused = False
        self.closed = False
        self.close_after = False
        self._stopped = False  # an upgrade, or a malformed body: nothing more is parsed
        self._serving: H1Request | None = None  # the request being answered

    # -- the connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self.server.guard.admit(self):
            self.closed = True
            self.transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm(self.limits.header_timeout_s, header=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.guard.forget(self)
        self._disarm()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: the handler releases what it holds
        self._pending.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client closed the connection"))
            self._drain.exception()  # retrieved: nobody may be waiting on it
        self._drain = None

    def abort(self) -> None:
        self.server.guard.forget(self)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("cannot write: the client closed the connection")
        self.transport.write(data)
        if self.paused:
            if self._drain is None:
                self._drain = self.loop.create_future()
            await self._drain

    # -- timers -----------------------------------------------------------------------------
    def _arm(self, seconds: float, *, header: bool) -> None:
        self._disarm()
        self._timer_is_header = header
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._timer_is_header:
            self.server.guard.header_timeouts_total += 1
        self.abort()

    # -- parsing ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closed or self._stopped:
            return
        if self._parsing is None and self._task is None and not self._in_head:
            # the first byte of a new head on an idle connection: the header deadline again
            self._arm(self.limits.header_timeout_s, header=True)
        if self._in_head or self._parsing is None:
            self._head_size += len(data)
        try:
            self.parser.feed_data(data)
        except _ProtocolError as exc:
            self._refuse(exc.status, exc.message)
        except httptools.HttpParserUpgrade:
            # An upgrade request (h2c, websocket): answered as plain HTTP/1.1 once complete,
            # the upgrade ignored, then the connection closes (the parser stops there)
            if self._task is not None or self._pending:
                self.close_after, self._stopped = True, True
            else:
                self._refuse(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            inner = exc.__context__
            if isinstance(inner, _ProtocolError):
                self._refuse(inner.status, inner.message)
            else:
                self._refuse(400, f"malformed request: {exc}"[:200])

    def _limit_head(self) -> None:
        lim = self.limits
        if self._head_size > lim.max_line_size + MAX_HEADERS * (lim.max_field_size + 4):
            raise _ProtocolError(431, "request head too large")

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url, self._url_size, self._headers = [], 0, []

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > self.limits.max_line_size:
            raise _ProtocolError(400, f"request line longer than {self.limits.max_line_size}"
                                 " bytes")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > self.limits.max_field_size:
            raise _ProtocolError(431, f"header field longer than {self.limits.max_field_size}"
                                 " bytes")
        if len(self._headers) >= MAX_HEADERS:
            raise _ProtocolError(431, f"more than {MAX_HEADERS} header fields")
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))
        self._limit_head()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_size = 0
        self._disarm()  # a complete head: the connection is busy, not evictable
        self.server.guard.waiting.pop(self, None)
        p = self.parser
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        request = H1Request(self, p.get_method().decode("ascii", "replace"),
                            b"".join(self._url), headers=headers,
                            version=p.get_http_version(), keep_alive=p.should_keep_alive())
        self._parsing = request
        length = headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            # declared too large: answered before any byte is read (``read`` raises 413)
            request.too_large = True
            request._size = int(length)
            request._complete()
        else:
            request.expects_continue = headers.get("Expect", "").lower() == "100-continue"
        if self._task is None:
            self._start(request)
        else:
            self._pending.append(request)
            if len(self._pending) >= MAX_PIPELINED and self.transport is not None:
                self._paused_reading = True
                self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing._body_part(body)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing._complete()
            self._parsing = None

    def _refuse(self, status: int, message: str) -> None:
        """A protocol error: answer it (unless an answer is under way) and close."""
        req = self._parsing
        if req is not None and req is self._serving and not self.closed:
            # the body of the request being answered broke the protocol: its read raises a
            # 400 for the handler to answer, then the connection closes
            req.malformed = message
            req._complete()
            self._parsing = None
            self.close_after = self._stopped = True
            return
        if self.transport is not None and self._task is None and not self.closed:
            self.transport.write(_serialise(self.server.bad_request(status, message), True))
        self.abort()

    # -- answering --------------------------------------------------------------------------
    def _start(self, request: H1Request) -> None:
        if request.expects_continue and not request.is_eof() and self.transport is not None:
            # its turn has come (no earlier answer is being written): ask for the body
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._serving = request
        self._task = self.loop.create_task(self._serve(request))

    def reusable(self, request: H1Request) -> bool:
        return request.keep_alive and not self.close_after and not request.too_large

    async def _serve(self, request: H1Request) -> None:
        try:
            answer = await self.server.dispatch(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an unexpected fault: answer, log a bounded amount
            _log.error("request failed", path=request.path, error=repr(exc)[:300])
            answer = self.server.bad_request(500, "internal error")
        if self.closed:
            return
        if isinstance(answer, H1Stream):
            close = self.close_after or not answer.done
        elif request.streamed:
            # a stream was started and an error answer came after it: the status is sent,
            # so the connection is closed (its chunked body ends unterminated)
            close = True
        else:
            close = not self.reusable(request) or answer.headers.get(
                "Connection", "").lower() == "close"
            with contextlib.suppress(ConnectionResetError):
                await self.write(_serialise(answer, close, head=request.method == "HEAD"))
        if not request.is_eof():  # answered before its body was read: do not linger
            close = True
        self._task = self._serving = None
        if close:
            if self.transport is not None:
                self.transport.close()
            self.closed = True
            self.server.guard.forget(self)
            return
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self.transport.resume_reading()
        if self._pending:
            self._start(self._pending.popleft())
        elif self._parsing is None:
            # idle between requests, or part of the next head came while this one was
            # answered: evictable, closed after the keep-alive timeout or the header deadline
            self.server.guard.waiting[self] = None
            if self._in_head:
                self._arm(self.limits.header_timeout_s, header=True)
            else:
                self._arm(self.limits.keepalive_timeout_s, header=False)


def _serialise(answer: Answer, close: bool, *, head: bool = False) -> bytes:
    if not isinstance(answer, web.Response):
        raise TypeError(f"a handler answered with {type(answer).__name__}, not a Response "
                        "or an H1Stream")
    body = answer.body
    if body is None:
        data = b""
    elif isinstance(body, bytes | bytearray):
        data = bytes(body)
    else:
        raise TypeError("a Response body must be bytes")
    headers = answer.headers
    pairs: Iterable[tuple[str, str]] = headers.items()
    if any(name in headers for name in _FRAMING):  # case-insensitive: the server's own
        pairs = [(k, v) for k, v in pairs if k.lower() not in _FRAMING_LOWER]
    lines = [f"HTTP/1.1 {answer.status} {answer.reason}\r\nDate: {_http_date()}\r\n"
             f"Content-Length: {len(data)}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in pairs]
    lines.append("Connection: close\r\n\r\n" if close else "\r\n")
    return "".join(lines).encode("latin-1") + (b"" if head else data)


_FRAMING = ("Content-Length", "Connection", "Transfer-Encoding")
_FRAMING_LOWER = frozenset(name.lower() for name in _FRAMING)


@dataclass
class H1Served:
    """A running server: its URLs, port and connection guard (for metrics and tests)."""

    urls: list[str]
    port: int
    guard: H1Guard


@contextlib.asynccontextmanager
async def serving(routes: dict[tuple[str, str], Handler], host: str, port: int,
                  limits: HttpLimits = _DEFAULT_LIMITS, *, max_body: int = 1 << 20,
                  errors: Errors | None = None,
                  bad_request: BadRequest = _plain_bad_request) -> AsyncIterator[H1Served]:
    """Serve ``routes`` (``(method, path) -> handler``) on ``host:port`` (0: a free port)
    until the block ends; then close every connection (handlers are cancelled) within
    ``limits.shutdown_timeout_s``."""
    srv = _Server(routes, limits, max_body, errors, bad_request)
    loop = asyncio.get_running_loop()
    limit_loop_errors(loop)
    server = await loop.create_server(srv, host, port, backlog=limits.backlog,
                                      reuse_address=True)
    try:
        urls, bound = listening(server, port)
        yield H1Served(urls, bound, srv.guard)
    finally:
        server.close()
        tasks = [c._task for c in srv.guard.open if c._task is not None]
        for conn in list(srv.guard.open):
            conn.abort()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limits.shutdown_timeout_s):
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                await server.wait_closed()
