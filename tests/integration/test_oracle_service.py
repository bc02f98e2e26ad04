"""The oracle against real redis-server and mosquitto: ingest, publish, serve, reject,
fail over, survive restarts. Batches are written in the agents' wire format with XADD."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis
from helpers import until
from netkv_oracle.identity import agent_acl_rules
from netkv_oracle.service import OracleService
from netkv_oracle.testkit import (
    KEYS,
    batch,
    get_json,
    metric,
    nic,
    oracle_settings,
    post_json,
    retained_version,
    rtt,
    xadd,
)
from redis.exceptions import NoPermissionError

from netkv.adapters.redis_client import connect_redis
from netkv.config import RedisSettings
from netkv.contracts.snapshot import decode_snapshot
from netkv.contracts.wire import MAX_BATCH_BYTES
from netkv.core.congestion import CongestionMap
from netkv.core.costmodel import static_tier_oracle
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.localservers import MosquittoServer, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TOPO = {"fabric": {"nic_gbps": 8}, "fat_tree": {}}  # 8 hosts, 1 GB/s NICs
GB = 1e9


@pytest.fixture
def topology() -> Topology:
    return parse_topology(TOPO)


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(RedisSettings(url=redis_server.url, timeout_s=1.0), retries=8)
    yield client
    await client.aclose()


@pytest.fixture
async def oracle(redis_server: RedisServer, mosquitto_server: MosquittoServer,
                 topology: Topology) -> AsyncIterator[OracleService]:
    settings = oracle_settings(redis_server.url, mosquitto_server.port, oracle_id="o1")
    async with OracleService(settings, topology) as service:
        await until(lambda: service.leading, 5)
        yield service


@pytest.fixture
async def steady_oracle(redis_server: RedisServer, mosquitto_server: MosquittoServer,
                        topology: Topology) -> AsyncIterator[OracleService]:
    """An oracle whose samples stay fresh for 3 x 5 s (for checks that take a while)."""
    settings = oracle_settings(redis_server.url, mosquitto_server.port, oracle_id="o1",
                               sample_interval_s=5.0)
    async with OracleService(settings, topology) as service:
        await until(lambda: service.leading, 5)
        yield service


async def test_samples_become_a_published_map(
        steady_oracle: OracleService, redis: aioredis.Redis, mosquitto_server: MosquittoServer,
        topology: Topology) -> None:
    oracle = steady_oracle
    hosts = [h.name for h in topology.hosts]
    for h in hosts:
        await xadd(redis, h, batch(h, nic(h, tx=0.9 * GB if h == "h001" else 0.0,
                                          rx=0.9 * GB if h == "h002" else 0.0),
                                   rtt(h, hosts[(hosts.index(h) + 1) % 8])))
    up1 = topology.link_index["h001/nic/up"]
    await until(lambda: oracle.builder.map.util[up1] > 0 and oracle.publisher.version > 0)
    await until(lambda: int(oracle.builder.map.hosts_alive().sum()) == 8)
    # Published: the Redis snapshot decodes to the same numbers; MQTT retains the version.
    async def published_map() -> CongestionMap | None:
        snap = await redis.get(KEYS.map_snapshot)
        cmap = decode_snapshot(topology, snap) if isinstance(snap, bytes) else None
        return cmap if cmap is not None and cmap.util[up1] > 0 else None

    published = await until(published_map)
    assert published.util[up1] == pytest.approx(0.9 * GB)
    announced = await retained_version(mosquitto_server.port)
    assert announced["version"] >= published.version > 0
    assert announced["snapshot_key"] == KEYS.map_snapshot
    # HTTP: a congested sender is slower than an idle one to the same place.
    status, busy = await get_json(oracle.port, "/v1/cost", src="h001", dst="h000",
                                  bytes="1e9")
    assert status == 200 and busy["tier"] == 1 and busy["confidence"] == 1.0
    status, idle = await get_json(oracle.port, "/v1/cost", src="h003", dst="h000",
                                  bytes="1e9")
    assert status == 200 and busy["seconds"] > 3 * idle["seconds"]
    status, many = await post_json(oracle.port, "/v1/costs",
                                   {"src": "h000", "dsts": hosts, "bytes": [1e9] * 8})
    assert status == 200 and [c["dst"] for c in many["costs"]] == hosts
    assert many["costs"][2]["seconds"] > many["costs"][3]["seconds"]  # h002 receives 0.9
    status, view = await get_json(oracle.port, "/v1/map")
    assert status == 200 and len(view["links"]) == topology.n_links
    assert all(h["alive"] for h in view["hosts"]) and view["pairs"] == 8
    assert await metric(oracle.port, "netkv_samples_ingested_total", kind="nic") == 8
    assert await metric(oracle.port, "netkv_map_version") > 0
    for path in ("/healthz", "/readyz"):
        assert (await get_json(oracle.port, path))[0] == 200


async def test_stale_agent_falls_back_to_the_prior(
        oracle: OracleService, redis: aioredis.Redis, topology: Topology) -> None:
    await xadd(redis, "h001", batch("h001", nic("h001", tx=0.0)))
    await until(lambda: oracle.builder.map.link_confidence()[
        topology.link_index["h001/nic/up"]] == 1.0)
    # Three intervals (0.2 s each) later nothing fresh remains: costs equal the tier prior.
    await until(lambda: oracle.builder.map.link_confidence()[
        topology.link_index["h001/nic/up"]] == 0.0, what="the sample gone stale")
    _, cost = await get_json(oracle.port, "/v1/cost", src="h001", dst="h000", bytes="1e9")
    prior = static_tier_oracle(topology).estimate(1, __import__("numpy").array([0]), 1e9)
    assert cost["confidence"] == 0.0
    assert cost["seconds"] == pytest.approx(float(prior.seconds[0]))


HOSTILE: list[tuple[str, Any]] = [
    ("bad_version", lambda: msgpack.packb({"v": 99, "agent": "h003", "seq": 1, "ts": 1.0,
                                           "samples": []})),
    ("not_finite", lambda: batch("h003", nic("h003", tx=float("nan")))),
    ("negative", lambda: batch("h003", nic("h003", tx=-5.0))),
    ("too_large", lambda: batch("h003", nic("h003", tx=1e20))),
    ("undecodable", lambda: batch("h003", nic("h003", tx=1.0))[:-7]),
    ("oversized", lambda: b"\x00" * (MAX_BATCH_BYTES + 1)),
    ("wrong_reporter", lambda: batch("h003", nic("h004", tx=1.0))),
    ("wrong_agent", lambda: batch("h004", nic("h004", tx=1.0))),
    ("foreign_link", lambda: batch("h003", nic("h003", tx=1.0, name="h004/nic/up"))),
    ("unknown_peer", lambda: batch("h003", rtt("h003", "h999"))),
    ("bad_entry", lambda: {"a": b"1", "b": b"2"}),
]


async def test_hostile_entries_are_rejected_counted_and_survived(
        oracle: OracleService, redis: aioredis.Redis, topology: Topology) -> None:
    for _, make in HOSTILE:
        await xadd(redis, "h003", make())
    good = batch("h003", nic("h003", tx=0.5 * GB))
    await xadd(redis, "h003", good)
    up3 = topology.link_index["h003/nic/up"]
    await until(lambda: oracle.builder.map.util[up3] == 0.5 * GB)
    for reason, _ in HOSTILE:
        assert await metric(oracle.port, "netkv_samples_rejected_total", reason=reason) == 1, \
            reason
    # Another host's links were never touched.
    assert oracle.builder.map.util[topology.link_index["h004/nic/up"]] == 0
    assert (await get_json(oracle.port, "/healthz"))[0] == 200
    # Everything was acknowledged: nothing left pending.
    pending = await redis.xpending(KEYS.samples_stream("h003"), KEYS.consumer_group)
    assert pending["pending"] == 0
    # ...and every rejected entry was deleted: only the good batch is left in Redis.
    assert await redis.xlen(KEYS.samples_stream("h003")) == 1
    assert await metric(oracle.port, "netkv_entries_deleted_total") == len(HOSTILE)


@pytest.mark.parametrize(("path", "params", "field"), [
    ("/v1/cost", {"src": "h000", "dst": "h001"}, "bytes"),
    ("/v1/cost", {"src": "nope", "dst": "h001", "bytes": "1"}, "src"),
    ("/v1/cost", {"src": "h000", "dst": "h001", "bytes": "-1"}, "bytes"),
    ("/v1/cost", {"src": "h000", "dst": "h001", "bytes": "nan"}, "bytes"),
    ("/v1/map", {"format": "xml"}, "format"),
])
async def test_bad_queries_get_4xx_naming_the_field(
        oracle: OracleService, path: str, params: dict[str, str], field: str) -> None:
    status, body = await get_json(oracle.port, path, **params)
    assert status == 400 and body["field"] == field


@pytest.mark.parametrize(("body", "field"), [
    (b"{not json", "body"),
    ([1, 2], "body"),
    ({"src": "h000", "dsts": ["h001"]}, "bytes"),
    ({"src": "h000", "dsts": [], "bytes": 1}, "dsts"),
    ({"src": "h000", "dsts": ["h001", 7], "bytes": 1}, "dsts[1]"),
    ({"src": "h000", "dsts": ["h001"], "bytes": [1, 2]}, "bytes"),
    ({"src": "h000", "dsts": ["h001"], "bytes": 1, "x": 1}, "x"),
])
async def test_bad_bodies_get_4xx_naming_the_field(oracle: OracleService, body: Any,
                                                   field: str) -> None:
    status, reply = await post_json(oracle.port, "/v1/costs", body)
    assert status == 400 and reply["field"] == field
    status, reply = await get_json(oracle.port, "/v1/nowhere")
    assert status == 404 and "error" in reply


async def test_acl_user_can_write_only_its_own_stream(redis_server: RedisServer,
                                                      redis: aioredis.Redis) -> None:
    await redis.execute_command("ACL", "SETUSER", "h000",  # type: ignore[no-untyped-call]
                                *agent_acl_rules(KEYS, "h000", "s3cret"))
    agent = aioredis.Redis(host=redis_server.host, port=redis_server.port, username="h000",
                           password="s3cret")
    try:
        await agent.xadd(KEYS.samples_stream("h000"), {"b": batch("h000", nic("h000", 1.0))})
        with pytest.raises(NoPermissionError, match="no permissions"):
            await agent.xadd(KEYS.samples_stream("h001"), {"b": batch("h001",
                                                                      nic("h001", 1.0))})
        with pytest.raises(NoPermissionError):
            await agent.set(KEYS.map_snapshot, b"forged")
        with pytest.raises(NoPermissionError):
            await agent.xrange(KEYS.samples_stream("h000"))
    finally:
        await agent.aclose()
    assert await redis.xlen(KEYS.samples_stream("h000")) == 1
    assert not await redis.exists(KEYS.samples_stream("h001"))


async def test_standby_takes_over_when_the_leader_dies(
        redis_server: RedisServer, mosquitto_server: MosquittoServer, topology: Topology,
        redis: aioredis.Redis) -> None:
    # Samples stay fresh for 3 x 2 s: the one written while nobody leads is still news.
    leader = OracleService(oracle_settings(redis_server.url, mosquitto_server.port,
                                           oracle_id="o1", sample_interval_s=2.0), topology)
    standby = OracleService(oracle_settings(redis_server.url, mosquitto_server.port,
                                            oracle_id="o2", sample_interval_s=2.0), topology)
    up5, up6 = topology.link_index["h005/nic/up"], topology.link_index["h006/nic/up"]
    await leader.__aenter__()
    try:
        await until(lambda: leader.leading)
        async with standby:
            await xadd(redis, "h005", batch("h005", nic("h005", tx=0.25 * GB)))
            await until(lambda: standby.followed is not None
                        and standby.followed.util[up5] > 0)
            assert not standby.leading and standby.current_map() is standby.followed
            status, _ = await get_json(standby.port, "/v1/cost", src="h005", dst="h000",
                                       bytes="1")
            assert status == 200  # the standby serves the published map
            v1 = leader.publisher.version

            # The leader dies without releasing its lock: the lease must run out first.
            async def no_release() -> None:
                return None

            leader.leadership.release = no_release  # type: ignore[method-assign]
            await leader.__aexit__(None, None, None)
            died = time.monotonic()
            await xadd(redis, "h006", batch("h006", nic("h006", tx=0.75 * GB)))
            await until(lambda: standby.leading, 5)
            assert time.monotonic() - died <= leader.settings.leader_ttl_s + 1.0
            await until(lambda: standby.builder.map.util[up6] == 0.75 * GB)
            await until(lambda: standby.publisher.version > v1)
            # Continued from the predecessor's map, not from scratch; versions kept rising.
            assert standby.builder.map.util[up5] == 0.25 * GB
            assert int(await redis.get(KEYS.map_version) or 0) >= standby.publisher.version
    finally:
        await leader.__aexit__(None, None, None)


async def test_crashed_consumer_entries_are_claimed(
        redis_server: RedisServer, mosquitto_server: MosquittoServer, redis: aioredis.Redis,
        topology: Topology) -> None:
    # A consumer of the group read an entry and died without XACK, before this oracle ran.
    stream = KEYS.samples_stream("h007")
    await xadd(redis, "h007", batch("h007", nic("h007", tx=2.0)))
    await redis.xgroup_create(stream, KEYS.consumer_group, id="0")
    got: Any = await redis.xreadgroup(KEYS.consumer_group, "ghost", {stream: ">"}, count=10)
    assert got and len(got[0][1]) == 1
    # Samples stay fresh for 3 x 2 s here: the claimed entry is old but not stale.
    settings = oracle_settings(redis_server.url, mosquitto_server.port, oracle_id="o1",
                               sample_interval_s=2.0)
    async with OracleService(settings, topology) as oracle:
        up7 = topology.link_index["h007/nic/up"]
        await until(lambda: oracle.builder.map.util[up7] == 2.0)
        assert await metric(oracle.port, "netkv_entries_claimed_total") == 1
        pending = await redis.xpending(stream, KEYS.consumer_group)
        assert pending["pending"] == 0


async def test_redis_and_broker_restarts_are_survived(
        oracle: OracleService, redis_server: RedisServer, mosquitto_server: MosquittoServer,
        redis: aioredis.Redis, topology: Topology) -> None:
    await xadd(redis, "h002", batch("h002", nic("h002", tx=1.0)))
    up2 = topology.link_index["h002/nic/up"]
    await until(lambda: oracle.builder.map.util[up2] == 1.0)
    before = oracle.publisher.version
    await redis_server.restart(down_s=0.5)  # no persistence: streams and groups are gone
    await until(lambda: oracle.leading, 10)
    await xadd(redis, "h002", batch("h002", nic("h002", tx=3.0)))
    await until(lambda: oracle.builder.map.util[up2] == 3.0, 10)
    await until(lambda: oracle.publisher.version > before, 5)
    await mosquitto_server.restart(down_s=0.5)
    await xadd(redis, "h002", batch("h002", nic("h002", tx=4.0)))
    await until(lambda: oracle.builder.map.util[up2] == 4.0, 10)
    v = oracle.publisher.version

    async def announced() -> bool:
        try:
            return bool((await retained_version(mosquitto_server.port, 1.0))["version"] >= v)
        except (AssertionError, TimeoutError, OSError, Exception):
            return False

    await until(announced, 10, 0.2)
    assert (await get_json(oracle.port, "/healthz"))[0] == 200
    assert await redis.get(KEYS.map_version) is not None
    assert time.time() - oracle.publisher.created_ts < 2
