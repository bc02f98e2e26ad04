"""The proxy front's own CPU per request, the h1 front (:mod:`netkv.http.h1`) against the
aiohttp front (:func:`netkv.http.server.serving` with the proxy's flags)
(``python -m netkv.bench.proxy_front [--requests N] [--rounds R] [--loop L]``).

One server process serves the same handler on both fronts (two ports): it reads the body of
the bench's non-streaming ``POST /v1/completions`` and answers a fixed completion with the
request's ``x-request-id``, as the proxy's front does around its legs (no legs, no
decision). This process sends the requests one at a time over a kept connection with the
proxy's engine client and reads the server process's CPU time (user + system, so the socket
calls count) per request, the two fronts alternating round by round. Loopback, one machine:
a figure to compare the two fronts, not the proxy's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from typing import Any

import psutil
from aiohttp import web
from netkv_proxy.engineclient import EnginePool, header_block

from netkv import eventloop
from netkv.bench.proxy import _body
from netkv.eventloop import add_loop_argument
from netkv.http import h1
from netkv.http.server import HttpLimits, serving
from netkv.localservers import free_port, wait_for_port
from netkv.tasks import stop_popen

ANSWER = (b'{"id":"cmpl-bench","object":"text_completion","model":"bench","choices":[{"index":'
          b'0,"text":"' + b"token " * 16 + b'","finish_reason":"length"}]}')


async def _handler(request: Any) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json",
                        headers={"x-request-id": request.headers.get("X-Request-Id", "")})


async def _serve(h1_port: int, aio_port: int) -> None:
    app = web.Application(client_max_size=32 << 20)
    app.router.add_post("/v1/completions", _handler)
    limits = HttpLimits()
    async with h1.serving({("POST", "/v1/completions"): _handler}, "127.0.0.1", h1_port,
                          limits, max_body=32 << 20), \
            serving(app, "127.0.0.1", aio_port, limits, handler_cancellation=True,
                    lingering_time=0.0):
        await asyncio.Event().wait()


async def _measure(ports: dict[str, int], server: psutil.Process, requests: int,
                   rounds: int) -> None:
    data = _body(False)
    extra = header_block({"X-Request-Id": "bench"})
    pools = {k: EnginePool(f"http://127.0.0.1:{p}", connect_timeout_s=3.0, max_connections=2)
             for k, p in ports.items()}
    try:
        for _ in range(rounds):
            for name, pool in pools.items():
                async def send(pool: EnginePool = pool, name: str = name) -> None:
                    async with pool.post("/v1/completions", data, extra,
                                         max_body=1 << 20) as r:
                        await r.read()
                        if r.status != 200:
                            raise RuntimeError(f"{name}: HTTP {r.status}")
                for _ in range(200):
                    await send()
                before = server.cpu_times()
                for _ in range(requests):
                    await send()
                after = server.cpu_times()
                cpu = (after.user - before.user + after.system - before.system) / requests
                print(f"{name:<8} front {cpu * 1e6:7.1f} us of server CPU per request; load "
                      f"average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for pool in pools.values():
            pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    add_loop_argument(parser, default="auto", what="this process and the server")
    parser.add_argument("--serve", type=int, nargs=2, metavar=("H1_PORT", "AIOHTTP_PORT"),
                        help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    loop = eventloop.resolve(args.loop, "--loop")
    if args.serve:
        eventloop.run(_serve(*args.serve), loop)
        return 0
    if not (1 <= args.requests <= 1_000_000 and 1 <= args.rounds <= 100):
        parser.error("--requests in 1..1000000, --rounds in 1..100")
    ports = {"h1": free_port(), "aiohttp": free_port()}
    proc = subprocess.Popen([sys.executable, "-m", "netkv.bench.proxy_front", "--loop", loop,
                             "--serve", str(ports["h1"]), str(ports["aiohttp"])],
                            stdout=subprocess.DEVNULL)
    try:
        async def run() -> None:
            for p in ports.values():
                await wait_for_port("127.0.0.1", p, timeout_s=30.0)
            await _measure(ports, psutil.Process(proc.pid), args.requests, args.rounds)

        print(f"event loop: {loop} (this process and the server)", flush=True)
        eventloop.run(run(), loop)
    finally:
        stop_popen(proc, 5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
