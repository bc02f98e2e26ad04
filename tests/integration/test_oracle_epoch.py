"""Issue 9 finding 3, oracle side: every oracle start (and leader term) has its own epoch, in
the snapshot envelope and the announcement, so a reader can tell an oracle restarted on an
empty Redis (whose versions count from 1 again) from an old message; followers accept such a
lower version. Snapshots also say when each agent was last heard from (``agents``).

On the main branch before this change the snapshot and announcement had no epoch, and a
follower ignored every version at or below the one it held (the test below fails there)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from helpers import until
from netkv_oracle.publisher import load_snapshot
from netkv_oracle.service import OracleService
from netkv_oracle.testkit import (
    KEYS,
    batch,
    nic,
    oracle_settings,
    retained_version,
    xadd,
)

from netkv.adapters.redis_client import connect_redis
from netkv.config import RedisSettings
from netkv.contracts.snapshot import decode_snapshot, encode_snapshot, snapshot_header
from netkv.core.congestion import CongestionMap
from netkv.core.topology_file import parse_topology
from netkv.localservers import MosquittoServer, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.security, pytest.mark.timeout(60)]

TOPO = parse_topology({"fabric": {"nic_gbps": 8}, "fat_tree": {}})


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(RedisSettings(url=redis_server.url, timeout_s=1.0), retries=8)
    yield client
    await client.aclose()


async def test_each_oracle_start_publishes_under_a_new_epoch(
        redis_server: RedisServer, mosquitto_server: MosquittoServer,
        redis: aioredis.Redis) -> None:
    epochs = []
    for run in range(2):
        settings = oracle_settings(redis_server.url, mosquitto_server.port, oracle_id="o1")
        async with OracleService(settings, TOPO) as oracle:
            await xadd(redis, "h003", batch("h003", nic("h003", tx=1.0)))
            await until(lambda: oracle.publisher.version > 0
                        and "h003" in oracle.builder.map.agents, 10)
            await until(lambda: oracle.publisher.version > 1, 10)
            data = await redis.get(KEYS.map_snapshot)
            assert isinstance(data, bytes)
            header = snapshot_header(data)
            announced = await retained_version(mosquitto_server.port)
            epochs.append(header.epoch)
            assert re.fullmatch(r"[0-9a-f]{16}", header.epoch)
            assert announced["epoch"] == header.epoch == oracle.publisher.epoch
            published = decode_snapshot(TOPO, data)
            assert set(published.agents) == {"h003"}  # per-agent freshness
            assert 0 < published.agents["h003"] <= header.created_ts
        if run == 0:
            await redis.flushall()  # the next oracle starts on an empty Redis
    assert epochs[0] != epochs[1]


async def test_a_follower_accepts_a_lower_version_only_from_a_new_epoch(
        redis: aioredis.Redis) -> None:
    def snapshot(version: int, epoch: str) -> bytes:
        cmap = CongestionMap(TOPO)
        cmap.observe_agent("h001", 1.7e9)
        return encode_snapshot(cmap, version, 1.7e9, epoch)

    async def publish(version: int, epoch: str) -> None:
        await redis.set(KEYS.map_version, version)
        await redis.set(KEYS.map_snapshot, snapshot(version, epoch))

    await publish(1574, "aaaaaaaaaaaaaaaa")
    held = await load_snapshot(redis, KEYS, TOPO)
    assert held is not None and held.version == 1574
    await publish(3, "aaaaaaaaaaaaaaaa")  # a stale write of the same term: ignored
    assert await load_snapshot(redis, KEYS, TOPO, newer_than=held.version,
                               epoch=held.epoch) is None
    await publish(3, "bbbbbbbbbbbbbbbb")  # a restarted oracle, empty Redis: accepted
    fresh = await load_snapshot(redis, KEYS, TOPO, newer_than=held.version, epoch=held.epoch)
    assert fresh is not None and (fresh.version, fresh.epoch) == (3, "bbbbbbbbbbbbbbbb")
    assert fresh.agents == {"h001": 1.7e9}
