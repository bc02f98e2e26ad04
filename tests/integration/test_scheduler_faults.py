"""Faults the scheduler must survive or report (issue 9 items 2, 3, 8 and issue 8's dead
background task), with a real redis-server and mosquitto. Each failed on 43248df: one deep
announcement ended the feed for good, a restarted oracle's lower versions were ignored,
silent agents and a dead background task left /readyz "ready"."""

from __future__ import annotations

import time

import aiohttp
import pytest
import redis.asyncio as aioredis
from helpers import until
from netkv_scheduler.app import SELECTOR
from netkv_scheduler.settings import demo_topology_path
from scheduler_kit import (
    get,
    measured_map,
    post,
    publish_map,
    readyz_is,
    select_body,
    serving,
    settings_for,
)

from netkv.adapters.mqtt_client import mqtt_client
from netkv.adapters.topology_file import load_topology
from netkv.config import MqttSettings
from netkv.contracts.names import MqttTopics
from netkv.localservers import MosquittoServer, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(90)]


async def test_a_deep_announcement_does_not_blind_the_feed(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    topo = load_topology(demo_topology_path())
    # A slow Redis poll: version 2 can only arrive through the (poisoned) MQTT feed.
    settings = settings_for(redis_server, mosquitto_server, map_poll_s=60.0)
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 1)
        await until(readyz_is(http, base, map_version=1))
        async with mqtt_client(MqttSettings(port=mosquitto_server.port)) as mqtt:
            for poison in (b"[" * 100_000 + b"]" * 100_000, b"{" * 5000, b"\xdc" * 64):
                await mqtt.publish(MqttTopics().map_version, poison, qos=1)
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 2)
        await until(readyz_is(http, base, map_version=2), 15.0)
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
        assert "too deeply nested" in text or "too large" in text


async def test_a_restarted_oracle_with_lower_versions_is_followed(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    topo = load_topology(demo_topology_path())
    settings = settings_for(redis_server, mosquitto_server, map_poll_s=0.5)
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        # made 1 s ago (fresh: map_stale_s is 10 s), so the restarted oracle's map is strictly
        # later without waiting for the wall clock to move
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 1574,
                          created_ts=time.time() - 1.0)
        await until(readyz_is(http, base, map_version=1574))
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await client.flushall()  # the oracle restarts on an empty Redis
        finally:
            await client.aclose()
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 1)
        await until(readyz_is(http, base, map_version=1), 15.0)
        code, answer = await post(http, f"{base}/v1/select", select_body("e", "h000-p0"))
        assert code == 200 and answer["map_version"] == 1 and not answer["map_stale"]


async def test_agents_gone_silent_make_readyz_degraded_by_name(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    topo = load_topology(demo_topology_path())
    settings = settings_for(redis_server, mosquitto_server, map_poll_s=0.3)
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        now = time.time()
        heard = measured_map(topo)
        for i in range(topo.n_hosts):
            heard.observe_rtt(i, (i + 1) % topo.n_hosts, srtt_s=1e-4, min_s=1e-4, p99_s=2e-4,
                              loss=0.0, ts=now)
        await publish_map(redis_server, mosquitto_server, heard, 1)
        await until(readyz_is(http, base, status="ready", map_version=1))
        later = measured_map(topo)
        later.host_seen_ts[:] = time.time()
        later.host_seen_ts[[topo.host_id("h003"), topo.host_id("h005")]] = now - 30.0
        await publish_map(redis_server, mosquitto_server, later, 2)
        await until(readyz_is(http, base, map_version=2))
        _, ready = await get(http, f"{base}/readyz")
        text = " ".join(ready["reasons"])
        assert ready["status"] == "degraded" and "h003" in text and "h005" in text
        assert "h000" not in text


async def test_a_dead_background_task_makes_readyz_degraded(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    topo = load_topology(demo_topology_path())
    settings = settings_for(redis_server, mosquitto_server)
    from netkv_scheduler.app import create_app

    app = create_app(settings, topo)

    def broken(every_s: float = 0.0) -> None:
        raise RuntimeError("sweeper killed by the test")
    async with serving(settings, topo, app=app) as base, aiohttp.ClientSession() as http:
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 1)
        await until(readyz_is(http, base, status="ready"))
        app[SELECTOR].sweep = broken  # type: ignore[method-assign]
        await until(readyz_is(http, base, status="degraded"), 10.0)
        _, ready = await get(http, f"{base}/readyz")
        assert any("reservation-sweeper" in r for r in ready["reasons"]), ready
