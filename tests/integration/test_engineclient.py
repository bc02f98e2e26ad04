"""The proxy's lean engine client (:mod:`netkv_proxy.engineclient`) against real loopback
servers that answer with hand-written HTTP/1.1 bytes: the framings (content-length, chunked,
close-delimited), keep-alive reuse, the keep-alive race, the bounds (head, body, read gap,
connect, connections), a reader that goes away, and flow control on a long stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from netkv_proxy.engineclient import EngineConnectError, EngineError, EnginePool, header_block

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback server running ``handler`` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = 0
        self.heads: list[bytes] = []
        self.port = 0

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(r, w)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            w.close()

    async def request(self, r: asyncio.StreamReader) -> bytes:
        """One request's head and body (by its content-length)."""
        head = await r.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return await r.readexactly(length)


@asynccontextmanager
async def serving(server: Server) -> AsyncIterator[EnginePool]:
    srv = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.port = srv.sockets[0].getsockname()[1]
    pool = EnginePool(f"http://127.0.0.1:{server.port}", connect_timeout_s=2.0,
                      max_connections=4)
    try:
        yield pool
    finally:
        pool.close()
        srv.close()
        await srv.wait_closed()


def answer(body: bytes, *, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def echo_keepalive(server: Server, r: asyncio.StreamReader,
                         w: asyncio.StreamWriter) -> None:
    while True:
        try:
            body = await server.request(r)
        except asyncio.IncompleteReadError:
            return
        w.write(answer(b'{"echo":' + body + b"}", extra=b"X-Netkv-Kv-Bytes: 7\r\n"))
        await w.drain()


async def test_content_length_answers_reuse_one_connection() -> None:
    server = Server(lambda r, w: echo_keepalive(server, r, w))
    async with serving(server) as pool:
        for i in range(5):
            async with pool.post("/v1/completions", b'{"n":%d}' % i,
                                 header_block({"X-Request-Id": f"r{i}"})) as resp:
                assert resp.status == 200
                assert resp.headers["x-netkv-kv-bytes"] == "7"  # names lower-cased
                assert await resp.read() == b'{"echo":{"n":%d}}' % i
        assert server.connections == 1
        assert len(pool.idle) == 1 and not pool.busy
        head = server.heads[-1]
        assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert b"\r\nX-Request-Id: r4\r\n" in head
        assert b"\r\nContent-Type: application/json\r\n" in head
        assert f"Host: 127.0.0.1:{server.port}".encode() in head


async def test_chunked_stream_arrives_in_pieces_and_the_connection_is_kept() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                await server.request(r)
            except asyncio.IncompleteReadError:
                return
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(3):
                data = b"data: %d\n\n" % i
                w.write(b"%x\r\n%s\r\n" % (len(data), data))
                await w.drain()
                await asyncio.sleep(0.02)
            w.write(b"0\r\n\r\n")
            await w.drain()

    server = Server(handler)
    async with serving(server) as pool:
        for _ in range(2):
            got = []
            async with pool.post("/v1/completions", b"{}") as resp:
                assert resp.headers["content-type"] == "text/event-stream"
                while (chunk := await resp.chunk()) is not None:
                    got.append(chunk)
            assert b"".join(got) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            assert len(got) >= 2  # passed on as it came, not at the end
        assert server.connections == 1


async def test_close_delimited_answer_ends_at_the_close_and_is_not_reused() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await w.drain()

    server = Server(handler)
    async with serving(server) as pool:
        for _ in range(2):
            async with pool.post("/x", b"{}") as resp:
                assert await resp.read() == b"all of it"
        assert server.connections == 2
        await asyncio.sleep(0.05)
        assert pool.open == 0


async def test_an_idle_connection_the_engine_closed_is_resent_once() -> None:
    """The keep-alive race: the engine closes a kept connection just as it is reused."""
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if server.connections > 1:
            await echo_keepalive(server, r, w)
            return
        await server.request(r)
        w.write(answer(b"{}"))
        await w.drain()
        await r.readuntil(b"\r\n\r\n")  # the second request arrives; close unanswered

    server = Server(handler)
    async with serving(server) as pool:
        async with pool.post("/x", b"{}") as resp:
            await resp.read()
        async with pool.post("/x", b'{"again":1}') as resp:
            assert await resp.read() == b'{"echo":{"again":1}}'
        assert server.connections == 2


async def test_a_closed_connection_mid_answer_is_an_error_not_a_resend() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await w.drain()

    server = Server(handler)
    async with serving(server) as pool:
        with pytest.raises(EngineError, match="before the end"):
            async with pool.post("/x", b"{}") as resp:
                await resp.read()
        assert server.connections == 1
        await asyncio.sleep(0.05)
        assert pool.open == 0


@pytest.mark.parametrize(("reply", "match"), [
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 << 10) + b"\r\n\r\n", "head over"),
    (b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * (200 << 10), "head over"),
    (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(150)) + b"\r\n",
     "head over"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"b" * 5000, "body over"),
    (b"NOT HTTP AT ALL\r\n\r\n", "malformed"),
])
async def test_oversized_or_malformed_answers_are_errors(reply: bytes, match: str) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(reply)
        await w.drain()
        await asyncio.sleep(1.0)

    server = Server(handler)
    async with serving(server) as pool:
        with pytest.raises(EngineError, match=match):
            async with pool.post("/x", b"{}", max_body=4096) as resp:
                await resp.read()
        await asyncio.sleep(0.05)
        assert pool.open == 0  # the connection was closed, not kept


async def test_a_silent_engine_hits_the_read_gap_timeout() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        async with asyncio.timeout(5):
            await r.read()  # then nothing more, until the client closes

    server = Server(handler)
    async with serving(server) as pool:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def read_two() -> None:
            async with pool.post("/x", b"{}", read_timeout=0.3) as resp:
                assert await resp.chunk() == b"hello"
                await resp.chunk()

        with pytest.raises(TimeoutError):
            await read_two()
        assert 0.25 < loop.time() - start < 2.0
        await asyncio.sleep(0.05)
        assert server.closed == 1  # the engine saw the connection close


async def test_connect_refused_is_a_connect_error() -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    pool = EnginePool(f"http://127.0.0.1:{port}", connect_timeout_s=1.0, max_connections=2)
    with pytest.raises(EngineConnectError, match="cannot connect"):
        async with pool.post("/x", b"{}"):
            pass
    assert pool.open == 0
    pool.close()


async def test_a_reader_that_goes_away_closes_the_connection() -> None:
    """The client left mid-stream: the task is cancelled, the engine sees the close."""
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(200):
            w.write(b"5\r\nhello\r\n")
            await w.drain()
            await asyncio.sleep(0.01)

    server = Server(handler)
    async with serving(server) as pool:
        first = asyncio.Event()

        async def read_forever() -> None:
            async with pool.post("/x", b"{}") as resp:
                while await resp.chunk() is not None:
                    first.set()

        task = asyncio.ensure_future(read_forever())
        await first.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(100):
            if server.closed:
                break
            await asyncio.sleep(0.02)
        assert server.closed == 1
        assert pool.open == 0


async def test_connections_per_engine_are_capped_and_waiters_get_them() -> None:
    active = 0
    peak = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal active, peak
        while True:
            try:
                await server.request(r)
            except asyncio.IncompleteReadError:
                return
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.05)
            active -= 1
            w.write(answer(b"{}"))
            await w.drain()

    server = Server(handler)
    async with serving(server) as pool:  # max_connections=4

        async def one() -> bytes:
            async with pool.post("/x", b"{}") as resp:
                return await resp.read()

        got = await asyncio.gather(*(one() for _ in range(12)))
        assert got == [b"{}"] * 12
        assert server.connections == 4 and peak == 4
        assert len(pool.idle) == 4 and not pool.busy


async def test_a_long_stream_read_slowly_is_paused_not_buffered() -> None:
    total = 8 << 20

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        piece = b"x" * (64 << 10)
        for _ in range(total // len(piece)):
            w.write(piece)
            await w.drain()

    server = Server(handler)
    async with serving(server) as pool:
        seen = 0
        biggest = 0
        async with pool.post("/x", b"{}") as resp:
            while (chunk := await resp.chunk()) is not None:
                seen += len(chunk)
                biggest = max(biggest, len(chunk))
                await asyncio.sleep(0.001)
        assert seen == total
        assert biggest <= 1 << 20  # reading paused near the high-water mark


def test_header_values_with_line_breaks_are_refused() -> None:
    assert header_block({"X-Request-Id": "abc"}) == b"X-Request-Id: abc\r\n"
    with pytest.raises(ValueError, match="CR or LF"):
        header_block({"Authorization": "Bearer x\r\nX-Evil: 1"})


async def test_the_whole_exchange_timeout_holds_against_a_trickle() -> None:
    """``timeout`` bounds the exchange however often bytes arrive (the read gap does not)."""
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(100):
            w.write(b"1\r\nx\r\n")
            await w.drain()
            await asyncio.sleep(0.05)

    server = Server(handler)
    async with serving(server) as pool:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def read_all() -> None:
            async with pool.post("/x", b"{}", read_timeout=0.3, timeout=0.5) as resp:
                await resp.read()

        with pytest.raises(TimeoutError):
            await read_all()
        assert 0.45 < loop.time() - start < 2.0
        await asyncio.sleep(0.05)
        assert pool.open == 0


async def test_the_whole_exchange_timeout_covers_waiting_for_a_connection() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        await asyncio.sleep(2.0)
        w.write(answer(b"{}"))
        await w.drain()

    server = Server(handler)
    async with serving(server) as pool:  # max_connections=4: the fifth waits

        async def one(limit_s: float) -> bytes:
            async with pool.post("/x", b"{}", timeout=limit_s) as resp:
                return await resp.read()

        busy = [asyncio.ensure_future(one(5.0)) for _ in range(4)]
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await one(0.3)
        assert not pool._waiters  # the timed-out waiter left the queue
        assert await asyncio.gather(*busy) == [b"{}"] * 4
