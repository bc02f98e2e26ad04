"""One engine leg's CPU per request, the proxy's engine client against aiohttp's client
(``python -m netkv.bench.proxy_legs [--requests N] [--rounds R] [--loop L]``; the engine and
this process on the same event loop).

Both send the decode leg's non-streaming ``POST /v1/completions`` one at a time over a kept
connection to the bench's instant engine (its own process) and read the answer; this
process's CPU time (user + system, so the socket calls count) per request is printed per
round, the two clients alternating. Loopback, one machine: a figure to compare the two
clients, not an engine's cost.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import aiohttp
from netkv_proxy.engineclient import EnginePool, header_block

from netkv import eventloop
from netkv.bench.proxy import _body
from netkv.eventloop import add_loop_argument
from netkv.localservers import free_port, wait_for_port
from netkv.tasks import stop_popen


async def _measure(port: int, requests: int, rounds: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/completions"
    data = _body(False)
    extra = header_block({"X-Request-Id": "bench"})
    pool = EnginePool(f"http://127.0.0.1:{port}", connect_timeout_s=3.0, max_connections=8)
    try:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=8), auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar()) as http:

            async def lean() -> None:
                async with pool.post("/v1/completions", data, extra, max_body=1 << 20) as r:
                    await r.read()

            async def aio() -> None:
                async with http.post(url, data=data, headers={
                        "X-Request-Id": "bench", "Content-Type": "application/json"}) as r:
                    await r.read()

            for _ in range(rounds):
                for name, send in (("engineclient", lean), ("aiohttp", aio)):
                    for _ in range(100):
                        await send()
                    start = time.process_time()
                    for _ in range(requests):
                        await send()
                    cpu = (time.process_time() - start) / requests
                    print(f"{name:<13} {cpu * 1e6:7.1f} us CPU per request; load average "
                          f"{os.getloadavg()[0]:.2f}", flush=True)
    finally:
        pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    add_loop_argument(parser, default="auto", what="this process and the engine")
    args = parser.parse_args()
    if not (1 <= args.requests <= 1_000_000 and 1 <= args.rounds <= 100):
        parser.error("--requests in 1..1000000, --rounds in 1..100")
    loop = eventloop.resolve(args.loop, "--loop")
    prefill, decode = free_port(), free_port()
    engine = subprocess.Popen([sys.executable, "-m", "netkv.bench.proxy_servers", "instant",
                               str(prefill), str(decode), "16", "--loop", loop],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def run() -> None:
            await wait_for_port("127.0.0.1", decode, timeout_s=30.0)
            await _measure(decode, args.requests, args.rounds)

        print(f"event loop: {loop} (this process and the engine)", flush=True)
        eventloop.run(run(), loop)
    finally:
        stop_popen(engine, 5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
