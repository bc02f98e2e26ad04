"""The replays' one streamed request (``netkv.testbed.client.stream_request``) against a real
aiohttp server on loopback, in both of its uses: the policy replay's (TTFT at the first body
bytes, ``first_token="chunk"``) and the router comparison's (TTFT at the first complete SSE
line, ``first_token="line"``, engine addresses named). The server sends the first line in two
writes and advances an injected clock between them, so the test sees exactly which read each
use timed, without a sleep deciding the verdict."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from netkv.testbed.client import FirstToken, stream_request
from netkv.testbed.engines import Request

pytestmark = pytest.mark.integration

REQ = Request("r7", 0.0, prompt_tokens=3, output_tokens=0, block_hashes=(1,))
PEER_ID = "___prefill_addr_127.0.0.1:8101___decode_addr_127.0.0.1:8202_5f3a"
NAMES = {"127.0.0.1:8101": "h000-p0", "127.0.0.1:8202": "h001-d0"}


@dataclass
class SteppedClock:
    """A clock the server moves: 0.5 when the request is sent, 1.0 once the first half of the
    first SSE line is written, 2.0 once the whole line is. ``read`` is set at the second
    reading (the client's first-token stamp)."""

    now: float = 0.5
    readings: list[float] = field(default_factory=list)
    read: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self) -> float:
        self.readings.append(self.now)
        if len(self.readings) == 2:
            self.read.set()
        return self.now


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def streaming(clock: SteppedClock, headers: dict[str, str], chunk_id: str,
              seen: list[tuple[dict[str, object], str]]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append((await request.json(), request.headers["x-request-id"]))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await resp.prepare(request)
        line = f'data: {json.dumps({"id": chunk_id, "choices": [{"text": "a"}]})}\n\n'
        half = len(line) // 2
        clock.now = 1.0
        await resp.write(line[:half].encode())
        # a client that stamps at the first bytes reads the clock now; one that waits for the
        # whole line cannot until the rest is written (the timeout only bounds that wait)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(clock.read.wait(), 1.0)
        clock.now = 2.0
        await resp.write(line[half:].encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    return handler


@pytest.mark.parametrize(("first_token", "stamped_at", "upstream_id"), [
    ("chunk", 1.0, ""),  # the policy replay: the first bytes the proxy passed on
    ("line", 2.0, "cmpl-9"),  # the router comparison: the first whole SSE line
])
async def test_ttft_is_timed_at_the_read_each_use_asks_for(
        first_token: FirstToken, stamped_at: float, upstream_id: str) -> None:
    clock = SteppedClock()
    seen: list[tuple[dict[str, object], str]] = []
    headers = {"x-netkv-prefill": "h000-p0", "x-netkv-decode": "h001-d0",
               "x-netkv-kv-bytes": "4096", "x-netkv-kv-start": "1.25",
               "x-netkv-kv-end": "1.75", "x-netkv-predicted-ms": "120", "x-netkv-map": "map v3"}
    async with serving(streaming(clock, headers, "cmpl-9", seen)) as url, \
            aiohttp.ClientSession() as http:
        out = await stream_request(http, url, REQ, prompt=[5, 6, 7], policy="netkv", t0=0.25,
                                   clock=clock, first_token=first_token)
    assert out.error is None
    assert clock.readings == [0.5, stamped_at]
    assert (out.arrival_s, out.prefill_start_s) == (0.25, 0.25)
    assert out.first_token_s == stamped_at - 0.25
    assert out.ttft_s == stamped_at - 0.5
    assert (out.prefill, out.decode, out.policy) == ("h000-p0", "h001-d0", "netkv")
    assert (out.kv_bytes, out.transfer_start_s, out.transfer_end_s) == (4096, 1.0, 1.5)
    assert out.predicted_ttft_s == pytest.approx(0.12)
    assert out.map_source == "map v3"
    assert out.upstream_id == upstream_id  # only a whole first line carries the chunk's id
    assert seen == [({"model": "netkv/emulated", "prompt": [5, 6, 7], "max_tokens": 1,
                      "stream": True}, "netkv-r7")]


async def test_the_comparison_names_a_peer_router_pair_on_the_loops_clock() -> None:
    """vllm-router says only engine addresses, in the chunk id; the comparison's clock is the
    event loop's, the same monotonic clock the engines stamp ``x-netkv-kv-*`` with."""
    stamped: dict[str, float] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        stamped["kv_start"] = time.monotonic()
        resp = web.StreamResponse(headers={"x-netkv-kv-bytes": "10",
                                           "x-netkv-kv-start": repr(stamped["kv_start"]),
                                           "x-netkv-kv-end": repr(time.monotonic())})
        await resp.prepare(request)
        await resp.write(f'data: {json.dumps({"id": PEER_ID})}\n\n'.encode())
        await resp.write_eof()
        return resp

    loop = asyncio.get_running_loop()
    async with serving(handler) as url, aiohttp.ClientSession() as http:
        t0 = loop.time()
        out = await stream_request(http, url, REQ, prompt=[1], policy="vllm-router:rr", t0=t0,
                                   clock=loop.time, first_token="line", names=NAMES)
    assert out.error is None
    assert (out.prefill, out.decode) == ("h000-p0", "h001-d0")
    assert out.upstream_id == PEER_ID
    assert 0.0 <= out.arrival_s <= out.transfer_start_s <= out.transfer_end_s \
        <= out.first_token_s


async def test_failures_are_outcomes_with_the_error_said() -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="no decode instance")

    async with serving(refuse) as url, aiohttp.ClientSession() as http:
        out = await stream_request(http, url, REQ, prompt=[1], policy="netkv", t0=0.0)
        assert out.error == "HTTP 503: no decode instance"
        assert out.first_token_s == 0.0
        with socket.socket() as s:  # a loopback port nothing listens on
            s.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{s.getsockname()[1]}"
        down = await stream_request(http, closed, REQ, prompt=[1], policy="netkv", t0=0.0)
    assert down.error is not None and down.error.startswith("ClientConnectorError")
