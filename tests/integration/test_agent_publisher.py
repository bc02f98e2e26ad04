"""The publisher against a real redis-server: batches, heartbeat, registry, trimming, and a
Redis restart survived with a bounded buffer that drops (and counts) the oldest batches."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
from helpers import until
from netkv_agent.agent import Agent
from netkv_agent.publisher import STREAM_FIELD, Publisher
from netkv_agent.settings import AgentSettings

from netkv.adapters.redis_client import connect_redis
from netkv.config import MqttSettings, RedisSettings
from netkv.contracts.names import RedisKeys
from netkv.contracts.registration import Registration, decode_registration
from netkv.contracts.samples import RttSample
from netkv.contracts.wire import Batch, decode_batch
from netkv.localservers import RedisServer

pytestmark = pytest.mark.integration
KEYS = RedisKeys()


def registration() -> Registration:
    return Registration(agent="h001", address="127.0.0.11", echo_port=4242, version="t",
                        started=1.0)


def sample(i: int) -> RttSample:
    return RttSample(reporter="h001", peer="h002", ts=time.time(), window_s=0.25, sent=i + 1,
                     lost=0, srtt_s=1e-4, p50_s=1e-4, p99_s=2e-4, min_s=5e-5)


def publisher(client: Any, **kw: Any) -> Publisher:
    return Publisher(client, KEYS, "h001", registration=registration, publish_interval_s=0.05,
                     heartbeat_ttl_s=3, op_timeout_s=1.0, max_backoff_s=0.2, **kw)


async def stream_batches(client: Any, agent: str = "h001") -> list[Batch]:
    entries = await client.xrange(KEYS.samples_stream(agent))
    return [decode_batch(fields[STREAM_FIELD.encode()]) for _, fields in entries]


async def seqs(client: Any) -> list[int]:
    return [b.seq for b in await stream_batches(client)]


async def test_batches_heartbeat_and_registry(redis_server: RedisServer) -> None:
    async with connect_redis(RedisSettings(url=redis_server.url)) as client:
        pub = publisher(client, max_batch_samples=3)
        pub.submit([sample(i) for i in range(7)])  # 3 + 3 + 1
        await pub.step()
        batches = await stream_batches(client)
        assert [len(b.samples) for b in batches] == [3, 3, 1]
        assert [b.seq for b in batches] == [1, 2, 3]
        first = batches[0].samples[0]
        assert first == msgspec.structs.replace(sample(0), ts=first.ts)
        assert isinstance(first, RttSample) and first.sent == 1
        ttl = await client.ttl(KEYS.heartbeat("h001"))
        assert 0 < ttl <= 3
        raw = await client.get(KEYS.registration("h001"))
        assert isinstance(raw, bytes)
        assert 0 < await client.ttl(KEYS.registration("h001")) <= 9  # 3 x heartbeat TTL
        reg = decode_registration(raw)
        assert reg == registration()
        assert pub.stats.samples_published == 7 and pub.stats.batches_published == 3


async def test_stream_is_trimmed_approximately(redis_server: RedisServer) -> None:
    async with connect_redis(RedisSettings(url=redis_server.url)) as client:
        pub = publisher(client, stream_maxlen=10, max_buffered_batches=1000)
        for i in range(400):
            pub.submit([sample(i)])
            pub.seal()
        await pub.flush()
        length = await client.xlen(KEYS.samples_stream("h001"))
        assert pub.stats.batches_published == 400
        assert 10 <= length < 400  # MAXLEN ~ trims whole nodes (100 entries by default)


async def test_redis_restart_is_survived_with_bounded_buffer(redis_server: RedisServer) -> None:
    async with connect_redis(RedisSettings(url=redis_server.url, timeout_s=0.5),
                             retries=0) as client:
        pub = publisher(client, max_buffered_batches=5)
        pub.submit([sample(0)])
        await pub.step()
        assert await seqs(client) == [1]
        await redis_server.stop()
        for i in range(1, 13):  # 12 batches while Redis is down; the buffer keeps 5
            pub.submit([sample(i), sample(i)])
            await pub.flush()
            pub.seal()
        assert not pub.stats.connected and pub.stats.publish_errors >= 1
        assert pub.buffered_batches == 5
        assert pub.stats.dropped_batches == 7 and pub.stats.dropped_samples == 14
        await redis_server.start()  # same port, empty (no persistence)
        await until(pub.flush, 10.0)
        assert pub.stats.connected and pub.stats.reconnects >= 1
        assert await seqs(client) == [9, 10, 11, 12, 13]  # the newest five, oldest first
        assert pub.buffered_batches == 0
        # a restarted (empty) Redis gets the registry entry back with the next heartbeat
        await pub.flush(force_heartbeat=True)
        assert await client.get(KEYS.registration("h001")) is not None
        assert await client.exists(KEYS.heartbeat("h001")) == 1


async def test_agent_keeps_probing_through_a_redis_outage(redis_server: RedisServer) -> None:
    def settings(name: str, address: str) -> AgentSettings:
        return AgentSettings(agent_id=name, listen_address=address, mqtt_enabled=False,
                             redis=RedisSettings(url=redis_server.url, timeout_s=0.5),
                             mqtt=MqttSettings(), publish_interval_s=0.1,
                             probe_interval_leaf_s=0.05, max_buffered_batches=8,
                             reconnect_max_backoff_s=0.3, heartbeat_ttl_s=2)

    async with Agent(settings("h001", "127.0.0.41")) as a, \
            Agent(settings("h002", "127.0.0.42")):
        await until(lambda: a.stats()["replies"] > 5, 5.0)
        await redis_server.stop()
        before = a.stats()
        # probing goes on while the buffer (8 batches at one per 0.1 s) overflows
        await until(lambda: a.stats()["dropped_batches"] > 0
                    and a.stats()["replies"] > before["replies"] + 10, 10.0,
                    what="batches dropped during the outage")
        during = a.stats()
        assert during["replies"] > before["replies"] + 10  # probing went on
        assert not during["redis_connected"]
        assert during["buffered_batches"] <= 8
        assert during["dropped_batches"] > 0  # 1.5 s at 0.1 s overflows 8 batches
        await redis_server.start()
        await until(lambda: a.stats()["redis_connected"], 10.0)
        async with connect_redis(RedisSettings(url=redis_server.url)) as client:
            await until(lambda: client.exists(KEYS.heartbeat("h001")), 5.0)
            batches = await stream_batches(client)
        assert batches and all(s.reporter == "h001" for b in batches for s in b.samples)
        kinds = {s.kind for b in batches for s in b.samples}
        assert "rtt" in kinds


