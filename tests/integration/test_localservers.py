"""The local server helpers really start, restart and stop redis-server and mosquitto."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from netkv.localservers import MosquittoServer, RedisServer, ServerError, wait_for_port

pytestmark = pytest.mark.integration


async def test_redis_server_restart_keeps_the_port(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(
        redis_server.url, retry=Retry(ExponentialBackoff(cap=0.2), 5),
        retry_on_error=[aioredis.ConnectionError])
    try:
        assert await client.ping()
        port = redis_server.port
        await redis_server.restart()
        assert redis_server.port == port
        assert await client.ping()  # the retry policy reconnects on the next command
    finally:
        await client.aclose()


async def test_mosquitto_accepts_connections(mosquitto_server: MosquittoServer) -> None:
    await wait_for_port(mosquitto_server.host, mosquitto_server.port, timeout_s=2)
    await mosquitto_server.stop()
    with pytest.raises(ServerError):
        await wait_for_port(mosquitto_server.host, mosquitto_server.port, timeout_s=0.3)


async def test_stop_is_bounded() -> None:
    server = RedisServer()
    async with server:
        assert server.running
    assert not server.running
    await asyncio.sleep(0)
