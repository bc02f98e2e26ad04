"""netkv.http.h1 on real sockets: keep-alive and pipelining, every limit (body size, line and
field sizes, header deadline, keep-alive timeout, connection cap with eviction), streamed
answers with backpressure, and a client that goes away cancelling its handler."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from netkv.http import h1
from netkv.http.server import HttpLimits

pytestmark = pytest.mark.integration

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
CHUNKS = 400


class App:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.entered = asyncio.Event()
        self.chunks_written = 0

    async def echo(self, request: h1.H1Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body, headers={"x-path": request.path,
                                                "x-query": request.query_string})

    async def slow(self, request: h1.H1Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(body=b"slow")

    async def early(self, request: h1.H1Request) -> web.Response:
        return web.Response(body=b"no thanks")  # answers without reading the body

    async def hang(self, request: h1.H1Request) -> web.Response:
        self.entered.set()
        try:
            await asyncio.sleep(60)
        finally:
            self.cancelled.set()
        return web.Response(body=b"late")

    async def stream(self, request: h1.H1Request) -> h1.H1Stream:
        out = await request.stream(200, {"Content-Type": "text/event-stream"})
        for i in range(CHUNKS):  # 25 MB: more than loopback's socket buffers hold
            await out.write(b"data: %d %s\n\n" % (i, b"x" * 64_000))
            self.chunks_written = i + 1
        await out.write_eof()
        return out

    async def broken(self, request: h1.H1Request) -> web.Response:
        out = await request.stream(200, {"Content-Type": "text/event-stream"})
        await out.write(b"data: 1\n\n")
        return web.Response(status=502, body=b"too late for a status")

    async def framing(self, request: h1.H1Request) -> web.Response:
        # framing headers a handler passed on (an engine's, lower-case): the server's own win
        return web.Response(body=b"12345", headers={"content-length": "999",
                                                    "transfer-encoding": "chunked",
                                                    "x-kept": "1"})

    def routes(self) -> dict[tuple[str, str], h1.Handler]:
        return {("POST", "/echo"): self.echo, ("GET", "/echo"): self.echo,
                ("GET", "/framing"): self.framing, ("GET", "/slow"): self.slow,
                ("GET", "/broken"): self.broken,
                ("POST", "/early"): self.early, ("GET", "/hang"): self.hang,
                ("GET", "/stream"): self.stream}


async def errors(request: Any, handler: Any) -> Any:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return web.Response(status=exc.status, body=f"error {exc.status}".encode())


@contextlib.asynccontextmanager
async def server(**limits: Any) -> AsyncIterator[tuple[App, h1.H1Served]]:
    app = App()
    lim = HttpLimits(**({"header_timeout_s": 5.0, "keepalive_timeout_s": 5.0} | limits))
    try:
        async with h1.serving(app.routes(), "127.0.0.1", 0, lim, max_body=1000,
                              errors=errors) as served:
            yield app, served
    finally:
        for w in _writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
        _writers.clear()


_writers: list[asyncio.StreamWriter] = []


async def connect(served: h1.H1Served) -> Conn:
    r, w = await asyncio.open_connection("127.0.0.1", served.port)
    _writers.append(w)  # closed when the server block ends
    return r, w


async def answer(r: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer with a Content-Length body."""
    async with asyncio.timeout(5):
        head = await r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)}
        body = await r.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def closed(r: asyncio.StreamReader, within: float = 5.0) -> bool:
    try:
        async with asyncio.timeout(within):
            while await r.read(65536):
                pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


async def test_keep_alive_and_pipelined_requests_answer_in_order() -> None:
    async with server() as (_, served):
        r, w = await connect(served)
        w.write(b"POST /echo?a=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\ntwo\r\n6\r\n three\r\n0\r\n\r\n"
                b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        first, second, third = await answer(r), await answer(r), await answer(r)
        assert first[0] == 200 and first[2] == b"one" and first[1]["x-query"] == "a=1"
        assert second[0] == 200 and second[2] == b"two three"
        assert third[0] == 200 and third[2] == b""
        assert "connection" not in third[1]  # still open: keep-alive
        w.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, _ = await answer(r)
        assert status == 200 and headers["connection"] == "close"
        assert await closed(r)
        w.close()


async def test_unknown_path_and_method_go_through_the_error_wrapper() -> None:
    async with server() as (_, served):
        r, w = await connect(served)
        w.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\nDELETE /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await answer(r))[::2] == (404, b"error 404")
        assert (await answer(r))[::2] == (405, b"error 405")
        w.write(b"HEAD /echo?q HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /echo?after HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):  # HEAD: the GET route's head, no body
            head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"x-query: q\r\n" in head
        status, headers, _ = await answer(r)
        assert status == 200 and headers["x-query"] == "after"
        w.close()


async def test_body_too_large_is_413_before_it_is_read_and_closes() -> None:
    async with server() as (_, served):
        r, w = await connect(served)
        w.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        status, headers, _ = await answer(r)
        assert status == 413 and headers["connection"] == "close"
        assert await closed(r)
        # a chunked body cut off past max_body
        r, w = await connect(served)
        w.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"3e8\r\n" + b"y" * 1000 + b"\r\n" + b"1\r\nz\r\n0\r\n\r\n")
        assert (await answer(r))[0] == 413
        assert await closed(r)


async def test_malformed_long_line_and_long_field_are_refused_and_closed() -> None:
    async with server(max_line_size=100, max_field_size=100) as (_, served):
        for raw, want in ((b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n\r\n", 400),
                          (b"GET /echo HTTP/1.1\r\nX-Big: " + b"b" * 200 + b"\r\n\r\n", 431),
                          (b"NOT HTTP AT ALL\r\n\r\n", 400)):
            r, w = await connect(served)
            w.write(raw)
            assert (await answer(r))[0] == want, raw[:40]
            assert await closed(r)


async def test_header_deadline_and_keep_alive_timeout_close_connections() -> None:
    async with server(header_timeout_s=0.3, keepalive_timeout_s=0.3) as (_, served):
        r, w = await connect(served)
        w.write(b"GET /echo HTTP/1.1\r\nHo")  # never finishes the head
        assert await closed(r, 3.0)
        assert served.guard.header_timeouts_total == 1
        r, w = await connect(served)
        w.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await answer(r))[0] == 200
        assert await closed(r, 3.0)  # idle past the keep-alive timeout
        assert served.guard.header_timeouts_total == 1
        assert not served.guard.open


async def test_at_the_cap_an_idle_connection_is_evicted_for_a_new_one() -> None:
    async with server(max_connections=16) as (_, served):
        assert served.guard.cap == 16
        idle = [await connect(served) for _ in range(16)]
        await asyncio.sleep(0.1)
        r, w = await connect(served)
        w.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await answer(r))[0] == 200
        assert served.guard.evicted_total >= 1
        assert len(served.guard.open) <= served.guard.cap
        assert await closed(idle[0][0], 2.0)  # the oldest idle one went first
        for _, iw in idle:
            iw.close()
        w.close()


async def test_answer_before_the_body_is_read_closes_the_connection() -> None:
    async with server() as (_, served):
        r, w = await connect(served)
        w.write(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        status, _, body = await answer(r)
        assert status == 200 and body == b"no thanks"
        assert await closed(r)


async def test_streamed_answer_waits_for_a_slow_reader_and_arrives_whole() -> None:
    async with server() as (app, served):
        r, w = await connect(served)
        w.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.5)  # the client reads nothing: the writer must pause
        assert 0 < app.chunks_written < CHUNKS, app.chunks_written
        async with asyncio.timeout(10):
            head = await r.readuntil(b"\r\n\r\n")
            assert b"Transfer-Encoding: chunked" in head
            got = []
            while True:
                size = int((await r.readuntil(b"\r\n")).strip(), 16)
                data = await r.readexactly(size + 2)
                if size == 0:
                    break
                got.append(data[:-2])
        assert len(got) == CHUNKS and got[-1].startswith(b"data: %d " % (CHUNKS - 1))
        w.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection is reusable
        assert (await answer(r))[0] == 200
        w.close()


async def test_http10_stream_is_not_chunked_and_ends_with_the_close() -> None:
    async with server() as (_, served):
        r, w = await connect(served)
        w.write(b"GET /stream HTTP/1.0\r\n\r\n")
        async with asyncio.timeout(10):
            data = await r.read(-1)
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"chunked" not in head and b"Connection: close" in head
        assert body.count(b"data: ") == CHUNKS


async def test_a_client_that_goes_away_cancels_its_handler() -> None:
    async with server() as (app, served):
        _, w = await connect(served)
        w.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            await app.entered.wait()
        w.close()
        async with asyncio.timeout(5):
            await app.cancelled.wait()
        await asyncio.sleep(0.05)
        assert not served.guard.open


async def test_a_request_leaves_nothing_for_the_garbage_collector() -> None:
    """Every request's objects are freed by reference counting: a cycle per request (the
    request referring to itself once did) makes the collector run every ~700 requests."""
    async with server() as (_, served):
        r, w = await connect(served)
        request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
        for _ in range(50):
            w.write(request)
            await answer(r)
        gc.collect()
        gc.disable()
        try:
            for _ in range(500):
                w.write(request)
                assert (await answer(r))[2] == b"one"
            left = gc.collect()
        finally:
            gc.enable()
        assert left < 25, f"{left} objects in cycles after 500 requests"


async def test_expect_100_continue_comes_in_its_turn() -> None:
    async with server() as (_, served):
        r, w = await connect(served)
        w.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
                b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 3\r\n\r\n")
        assert (await answer(r))[2] == b"one"  # the first answer before the 100
        async with asyncio.timeout(5):
            assert await r.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        w.write(b"two")
        assert (await answer(r))[::2] == (200, b"two")


async def test_an_error_after_a_stream_started_closes_the_connection() -> None:
    async with server() as (_, served):
        r, w = await connect(served)
        w.write(b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            data = await r.read(-1)  # ends: the connection is closed
        assert data.startswith(b"HTTP/1.1 200") and b"data: 1" in data
        assert b"502" not in data and not data.endswith(b"0\r\n\r\n")


async def test_an_upgrade_request_is_answered_as_http11_then_closed() -> None:
    """curl --http2 on http:// asks for h2c: the answer is plain HTTP/1.1, as on aiohttp."""
    async with server() as (_, served):
        r, w = await connect(served)
        w.write(b"GET /echo?u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        status, headers, _ = await answer(r)
        assert status == 200 and headers["x-query"] == "u"
        assert await closed(r)


HOSTILE = {
    "content-length and chunked": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "two content-lengths": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                           b"Content-Length: 4\r\n\r\nabcd",
    "bare LF": b"GET /echo HTTP/1.1\nHost: x\n\n",
    "NUL in a header": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "negative length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("raw", HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_requests_are_refused_and_closed(raw: bytes) -> None:
    async with server() as (_, served):
        r, w = await connect(served)
        w.write(raw)
        assert (await answer(r))[0] == 400
        assert await closed(r)
        await asyncio.sleep(0.05)
        assert not served.guard.open


async def test_framing_headers_are_the_servers_own() -> None:
    async with server() as (_, served):
        r, w = await connect(served)
        w.write(b"GET /framing HTTP/1.1\r\nHost: x\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            head = (await r.readuntil(b"\r\n\r\n")).lower()
            assert head.count(b"content-length") == 1 and b"content-length: 5\r\n" in head
            assert b"transfer-encoding" not in head and b"x-kept: 1" in head
            assert await r.readexactly(5) == b"12345"
        assert (await answer(r))[0] == 200  # the next answer is framed right after it


async def test_a_head_begun_during_an_answer_still_has_a_deadline() -> None:
    async with server(header_timeout_s=0.5, keepalive_timeout_s=30.0) as (_, served):
        r, w = await connect(served)
        w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /echo HTTP/1.1\r\nHo")
        assert (await answer(r))[2] == b"slow"
        assert await closed(r, 3.0)  # the half head: closed at the header deadline
        assert served.guard.header_timeouts_total == 1


async def test_a_malformed_body_is_a_400_from_the_handler_then_closed() -> None:
    async with server() as (_, served):
        r, w = await connect(served)
        w.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"zz\r\nnot a chunk\r\n")
        status, headers, body = await answer(r)
        assert (status, body) == (400, b"error 400") and headers["connection"] == "close"
        assert await closed(r)
