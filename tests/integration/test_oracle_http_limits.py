"""The oracle's HTTP server has the same limits as the scheduler's (issue 9 item 4).

An oracle against real redis-server and mosquitto; this process opens idle connections and
slowloris connections (one header byte every 0.2 s) on loopback, then a legitimate client makes
fresh-connection requests. Slowloris heads are closed by the header deadline instead of held
open; the legitimate client's p99 stays low.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import numpy as np
import pytest
from helpers import raise_nofile, until
from netkv_oracle.service import OracleService
from netkv_oracle.testkit import oracle_settings

from netkv.core.topology_file import parse_topology
from netkv.localservers import MosquittoServer, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.security, pytest.mark.timeout(90)]

IDLE, SLOW = 600, 100


async def _slowloris(host: str, port: int, stop: asyncio.Event,
                     closed_after: list[float]) -> None:
    try:
        async with asyncio.timeout(5):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return
    start = time.monotonic()
    try:
        writer.write(b"GET /v1/map HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        while not stop.is_set():  # bounded by the test's own deadline (stop)
            await writer.drain()
            writer.write(b"a")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await stop.wait()
    except (ConnectionError, OSError):
        closed_after.append(time.monotonic() - start)
    finally:
        writer.close()


async def test_oracle_serves_a_client_under_idle_and_slowloris_floods(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    if raise_nofile() < 2 * (IDLE + SLOW) + 512:
        pytest.skip("this process's hard file limit is too low for the flood")
    topology = parse_topology({"fabric": {"nic_gbps": 8}, "fat_tree": {}})
    settings = oracle_settings(redis_server.url, mosquitto_server.port, oracle_id="flood")
    async with OracleService(settings, topology) as oracle:
        await until(lambda: oracle.leading, 5)
        host, port = "127.0.0.1", oracle.port
        idle = []
        for _ in range(IDLE):
            with contextlib.suppress(OSError):
                idle.append((await asyncio.open_connection(host, port))[1])
        stop = asyncio.Event()
        closed_after: list[float] = []
        slow = [asyncio.create_task(_slowloris(host, port, stop, closed_after))
                for _ in range(SLOW)]
        latencies: list[float] = []
        try:
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True)) as http:
                deadline = time.monotonic() + 8.0  # bounded: ~8 s of requests
                while time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    async with asyncio.timeout(2.0), http.get(
                            f"http://{host}:{port}/healthz") as resp:
                        await resp.read()
                        assert resp.status == 200
                    latencies.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.gather(*slow, return_exceptions=True)
            for w in idle:
                w.close()
        p99_ms = float(np.percentile(np.array(latencies) * 1e3, 99))
        print(f"oracle: {len(latencies)} legitimate requests, p99 {p99_ms:.1f} ms; "
              f"slowloris closed by the server: {len(closed_after)}/{len(slow)}")
        assert len(latencies) >= 100 and p99_ms < 50.0, p99_ms
        # The default header deadline is 5 s: slowloris heads are closed, not kept.
        assert len(closed_after) >= 0.9 * len(slow)
