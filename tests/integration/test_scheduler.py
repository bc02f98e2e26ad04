"""The scheduler app over real HTTP, with a real redis-server and mosquitto.

Maps are published the way the oracle does: a CongestionMap snapshot in Redis plus its version
key, then a retained version announcement on MQTT.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import until
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
from netkv.config import MqttSettings
from netkv.contracts.names import MqttTopics, RedisKeys
from netkv.core.topology_file import load_topology, parse_topology
from netkv.localservers import MosquittoServer, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

# Prefill on a1; "near" decoder on a2 (same leaf); "far" decoder on b1 (across the core).
THREE_HOSTS = {
    "fabric": {"nic_gbps": 400, "leaf_oversubscription": 1, "pod_oversubscription": 1},
    "hosts": [{"name": "a1", "leaf": "la", "pod": "pa"},
              {"name": "a2", "leaf": "la", "pod": "pa"},
              {"name": "b1", "leaf": "lb", "pod": "pb"}],
    "instances": [{"name": "p0", "role": "prefill", "host": "a1"},
                  {"name": "near", "role": "decode", "host": "a2"},
                  {"name": "far", "role": "decode", "host": "b1"}],
}


async def test_select_and_release(redis_server: RedisServer,
                                  mosquitto_server: MosquittoServer) -> None:
    topo = load_topology(demo_topology_path())
    settings = settings_for(redis_server, mosquitto_server)
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        status, ready = await get(http, f"{base}/readyz")
        assert status == 503 and ready["status"] == "not ready"
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 1)

        async def has_map() -> bool:
            return (await get(http, f"{base}/readyz"))[0] == 200
        await until(has_map)

        status, answer = await post(http, f"{base}/v1/select",
                                    select_body("r1", "h000-p0", block_hashes=[1, 2, 3]))
        assert status == 200, answer
        assert answer["decode"] == "h000-d1"  # same host: tier 0, nothing else loaded
        assert answer["tier"] == 0 and answer["map_version"] == 1
        assert answer["map_stale"] is False and answer["reserved"] is True
        b = answer["breakdown"]
        assert answer["predicted_ttft_ms"] == pytest.approx(
            b["queue_ms"] + b["transfer_ms"] + b["first_token_ms"], abs=1e-3)
        assert b["transfer_ms"] > 0

        _, listing = await get(http, f"{base}/v1/instances")
        booked = {i["name"]: i.get("reservations") for i in listing["instances"]}
        assert booked["h000-d1"] == 1 and listing["open_reservations"] == 1

        status, rel = await post(http, f"{base}/v1/release", {"request_id": "r1"})
        assert status == 200 and rel == {"request_id": "r1", "released": True,
                                         "decode": "h000-d1"}
        status, rel = await post(http, f"{base}/v1/release", {"request_id": "r1"})
        assert status == 200 and rel["released"] is False  # idempotent
        _, listing = await get(http, f"{base}/v1/instances")
        assert listing["open_reservations"] == 0 and listing["transfers_in_flight"] == 0

        status, err = await post(http, f"{base}/v1/select", select_body("r2", "nope"))
        assert status == 400 and err["field"] == "body.prefill"
        status, err = await post(http, f"{base}/v1/select", {"request_id": "r3",
                                                             "prefill": "h000-p0"})
        assert status == 400 and err["field"] == "body.prompt_tokens"
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
        assert 'netkv_bad_requests_total{field="body.prompt_tokens"} 1.0' in text
        assert "netkv_decision_duration_seconds_count" in text
        assert "netkv_map_age_seconds" in text


async def test_reservations_expire(redis_server: RedisServer,
                                   mosquitto_server: MosquittoServer) -> None:
    topo = load_topology(demo_topology_path())
    settings = settings_for(redis_server, mosquitto_server, reservation_ttl_s=0.5)
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        status, _ = await post(http, f"{base}/v1/select", select_body("lost", "h000-p0"))
        assert status == 200
        assert (await get(http, f"{base}/v1/instances"))[1]["open_reservations"] == 1

        async def expired() -> bool:
            listing = (await get(http, f"{base}/v1/instances"))[1]
            return bool(listing["open_reservations"] == 0 and listing["expired_total"] == 1)
        await until(expired, 5.0)


async def test_congestion_on_mqtt_moves_choice_nearer(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    topo = parse_topology(THREE_HOSTS)
    # A slow Redis poll: the move must come from the MQTT announcement.
    settings = settings_for(redis_server, mosquitto_server, map_poll_s=60.0)
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        # The near decoder's KV memory is almost full: it would queue the request a while.
        status, _ = await post(http, f"{base}/v1/instances", {"name": "near", "kv_use": 0.99})
        assert status == 200
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 1)
        await until(readyz_is(http, base, map_version=1))
        body = select_body("x", reserve=False)
        _, first = await post(http, f"{base}/v1/select", body)
        assert first["decode"] == "far" and first["tier"] == 3 and first["map_version"] == 1

        # Traffic saturates pod pa's core uplink: the far path slows ~10x.
        await publish_map(redis_server, mosquitto_server,
                          measured_map(topo, {"pa/up": 1.0}), 2)
        await until(readyz_is(http, base, map_version=2), 10.0)
        _, second = await post(http, f"{base}/v1/select", body)
        assert second["decode"] == "near" and second["tier"] == 1
        assert second["map_version"] == 2
        assert second["breakdown"]["queue_ms"] > 0


async def test_broker_down_keeps_answering_then_recovers(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    topo = load_topology(demo_topology_path())
    settings = settings_for(redis_server, mosquitto_server, map_poll_s=0.3)
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 1)
        await until(readyz_is(http, base, status="ready"))
        await mosquitto_server.stop()
        await until(readyz_is(http, base, status="degraded"))
        code, ready = await get(http, f"{base}/readyz")
        assert code == 200 and any("mqtt" in r for r in ready["reasons"])
        code, answer = await post(http, f"{base}/v1/select", select_body("b1", "h001-p0"))
        assert code == 200 and answer["map_version"] == 1 and not answer["map_stale"]
        # A version published while the broker is away still arrives, via the Redis poll.
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 2,
                          announce=False)
        await until(readyz_is(http, base, map_version=2))
        await mosquitto_server.start()
        await until(readyz_is(http, base, status="ready"), 20.0)


async def test_redis_down_keeps_answering_then_recovers(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    topo = load_topology(demo_topology_path())
    settings = settings_for(redis_server, mosquitto_server, map_poll_s=0.3,
                            redis_timeout_s=0.5)
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 1)
        await until(readyz_is(http, base, status="ready", map_version=1))
        await redis_server.stop()
        await until(readyz_is(http, base, status="degraded"))
        _, body = await get(http, f"{base}/readyz")
        assert any("redis" in r for r in body["reasons"]) and body["redis_ok"] is False
        started = time.monotonic()
        code, answer = await post(http, f"{base}/v1/select", select_body("r", "h002-p0"))
        assert code == 200 and answer["map_version"] == 1
        assert time.monotonic() - started < 0.5  # the decision never waits for Redis
        await redis_server.start()  # comes back empty (no persistence): the oracle re-publishes
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 2)
        await until(readyz_is(http, base, status="ready", map_version=2), 20.0)


async def test_burst_spreads_instead_of_herding(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    topo = load_topology(demo_topology_path())
    # Decoders with room for about 12 such requests each (KV memory in tokens).
    settings = settings_for(redis_server, mosquitto_server, capacity_tokens=100_000.0)
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 1)

        async def ready() -> bool:
            return (await get(http, f"{base}/readyz"))[0] == 200
        await until(ready)

        async def burst(reserve: bool, tag: str) -> Counter[str]:
            answers = await asyncio.gather(*(
                post(http, f"{base}/v1/select",
                     select_body(f"{tag}{i}", "h000-p0", 8000, output_tokens=500,
                                 reserve=reserve))
                for i in range(32)))
            assert all(code == 200 for code, _ in answers)
            return Counter(a["decode"] for _, a in answers)

        herd = await burst(False, "n")  # without bookings every request sees the same state
        assert len(herd) == 1
        spread = await burst(True, "r")
        assert len(spread) >= 3, spread
        assert max(spread.values()) <= 16, spread
        _, listing = await get(http, f"{base}/v1/instances")
        assert listing["open_reservations"] == 32


async def test_bearer_token_guards_mutating_endpoints(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    topo = load_topology(demo_topology_path())
    settings = settings_for(redis_server, mosquitto_server, token="s3cret")
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        body = select_body("t1", "h000-p0")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            async with http.post(f"{base}/v1/select", json=body, headers=headers) as resp:
                assert resp.status == 401 and (await resp.json())["field"] == "auth"
                assert resp.headers["WWW-Authenticate"] == "Bearer"
        async with http.post(f"{base}/v1/select", json=body,
                             headers={"Authorization": "Bearer s3cret"}) as resp:
            assert resp.status == 200
        assert (await get(http, f"{base}/v1/instances"))[0] == 200  # reads stay open
        async with http.get(f"{base}/openapi.json") as resp:
            doc = await resp.json()
        assert doc["paths"]["/v1/select"]["post"]["security"] == [{"bearer": []}]


async def test_scrapes_engine_load_from_prometheus(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    """An engine's /metrics in vLLM's format (emulated: there is no GPU engine here)."""
    gauges = {"running": 7, "waiting": 3, "kv": 0.5}

    async def engine_metrics(request: web.Request) -> web.Response:
        text = ("# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="m"}} {gauges["running"]}\n'
                "# TYPE vllm:num_requests_waiting gauge\n"
                f'vllm:num_requests_waiting{{model_name="m"}} {gauges["waiting"]}\n'
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                f'vllm:kv_cache_usage_perc{{model_name="m"}} {gauges["kv"]}\n')
        return web.Response(text=text)
    engine = web.Application()
    engine.router.add_get("/metrics", engine_metrics)
    runner = web.AppRunner(engine)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    engine_url = "http://{}:{}/metrics".format(*runner.addresses[0][:2])
    topo = load_topology(demo_topology_path())
    settings = settings_for(redis_server, mosquitto_server, scrape_interval_s=0.2,
                            scrape_allow=("127.0.0.1",))  # the emulated engine is local
    try:
        async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
            status, _ = await post(http, f"{base}/v1/instances",
                                   {"name": "h002-d1", "metrics_url": engine_url})
            assert status == 200

            def load_of(listing: Any) -> dict[str, Any]:
                return next(i for i in listing["instances"] if i["name"] == "h002-d1")

            async def scraped(running: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    entry = load_of((await get(http, f"{base}/v1/instances"))[1])
                    return bool(entry["running"] == running and entry["scrape_error"] is None)
                return check
            await until(await scraped(7), 10.0)
            entry = load_of((await get(http, f"{base}/v1/instances"))[1])
            assert entry["waiting"] == 3 and entry["kv_use"] == 0.5
            gauges["running"] = 1
            await until(await scraped(1), 10.0)
    finally:
        await runner.cleanup()


async def test_pair_policy_chooses_prefill_and_decoder_jointly(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    topo = load_topology(demo_topology_path())
    # No hysteresis: netkv_pair keeps the requested prefill unless the joint choice saves
    # more than prefill_margin_s (0.1 s by default since the evaluation branch); this test
    # is about the joint choice itself.
    settings = settings_for(redis_server, mosquitto_server,
                            policy_params={"netkv_pair": {"prefill_margin_s": 0.0}})
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 1)
        # h000's decoder is full: the best single pick from h000-p0 crosses the network,
        # while the joint choice can keep prefill and decode on one host.
        await post(http, f"{base}/v1/instances", {"name": "h000-d1", "kv_use": 1.0})
        _, single = await post(http, f"{base}/v1/select",
                               select_body("s", "h000-p0", reserve=False))
        _, pair = await post(http, f"{base}/v1/select",
                             select_body("p", "h000-p0", policy="netkv_pair", reserve=False))
        assert single["prefill"] == "h000-p0" and single["tier"] > 0
        assert pair["policy"] == "netkv_pair" and pair["tier"] == 0
        assert pair["prefill"].split("-")[0] == pair["decode"].split("-")[0] != "h000"
        assert pair["predicted_ttft_ms"] < single["predicted_ttft_ms"]


async def test_bad_snapshot_and_announcement_are_rejected_not_fatal(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    import redis.asyncio as aioredis
    topo = load_topology(demo_topology_path())
    settings = settings_for(redis_server, mosquitto_server, map_poll_s=0.3)
    async with serving(settings, topo) as base, aiohttp.ClientSession() as http:
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 1)
        await until(readyz_is(http, base, map_version=1))
        keys = RedisKeys()
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await client.set(keys.map_snapshot, b"\x81\xa6schema\x63garbage")
            await client.set(keys.map_version, 2)
        finally:
            await client.aclose()
        async with mqtt_client(MqttSettings(port=mosquitto_server.port)) as mqtt:
            await mqtt.publish(MqttTopics().map_version, b"not a version", qos=1)
            await mqtt.publish(MqttTopics().map_version, b'{"version": 2}', qos=1)

        async def rejected() -> bool:
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
            line = next(x for x in text.splitlines() if x.startswith("netkv_map_rejected "))
            return float(line.split()[1]) >= 2
        await until(rejected, 10.0)
        code, answer = await post(http, f"{base}/v1/select", select_body("z", "h001-p0"))
        assert code == 200 and answer["map_version"] == 1
        await publish_map(redis_server, mosquitto_server, measured_map(topo), 3)
        await until(readyz_is(http, base, map_version=3))  # the feed is still alive
