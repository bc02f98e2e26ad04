"""Helpers of the scheduler's integration tests: the app on a free port and maps published
the way the oracle does (a CongestionMap snapshot in Redis plus its version key, then a
retained version announcement on MQTT)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from netkv_scheduler.app import create_app
from netkv_scheduler.settings import SchedulerSettings

from netkv.adapters.mqtt_client import mqtt_client
from netkv.config import MqttSettings, RedisSettings
from netkv.contracts.names import MqttTopics, RedisKeys
from netkv.contracts.snapshot import encode_snapshot
from netkv.core.congestion import CongestionMap
from netkv.core.topology import Topology
from netkv.localservers import MosquittoServer, RedisServer


@asynccontextmanager
async def serving(settings: SchedulerSettings, topology: Topology,
                  app: web.Application | None = None) -> AsyncIterator[str]:
    """The real app (or ``app``) on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app or create_app(settings, topology), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def settings_for(redis: RedisServer, mosquitto: MosquittoServer, **kw: Any) -> SchedulerSettings:
    return SchedulerSettings(redis=RedisSettings(url=redis.url),
                             mqtt=MqttSettings(port=mosquitto.port, keepalive_s=2), **kw)


async def publish_map(redis: RedisServer, mosquitto: MosquittoServer, cmap: CongestionMap,
                      version: int, *, announce: bool = True,
                      created_ts: float | None = None) -> None:
    """What the oracle does: snapshot + version in Redis, then the retained announcement.
    ``created_ts`` is the map's creation time (default: the map's clock, now)."""
    import redis.asyncio as aioredis
    keys = RedisKeys()
    client = aioredis.Redis.from_url(redis.url)
    try:
        await client.set(keys.map_snapshot, encode_snapshot(cmap, version, created_ts))
        await client.set(keys.map_version, version)
    finally:
        await client.aclose()
    if announce:
        settings = MqttSettings(port=mosquitto.port)
        async with mqtt_client(settings) as mqtt:
            await mqtt.publish(MqttTopics().map_version, json.dumps({"version": version}),
                               qos=1, retain=True)


def measured_map(topology: Topology, congested: dict[str, float] | None = None) -> CongestionMap:
    """Every link measured just now; ``congested`` maps link name -> utilisation fraction."""
    cmap = CongestionMap(topology)
    now = time.time()
    for i, link in enumerate(topology.links):
        util = (congested or {}).get(link.name, 0.0) * link.capacity_bytes_s
        cmap.observe_link(i, util, now)
    return cmap


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


def readyz_is(http: aiohttp.ClientSession, base: str, **want: Any) \
        -> Callable[[], Awaitable[bool]]:
    """A check for :func:`until`: ``/readyz`` reports every field of ``want``."""
    async def check() -> bool:
        body = (await get(http, f"{base}/readyz"))[1]
        return all(body[key] == value for key, value in want.items())
    return check


def select_body(rid: str, prefill: str = "p0", tokens: int = 8000, **kw: Any) -> dict[str, Any]:
    return {"request_id": rid, "prefill": prefill, "prompt_tokens": tokens, **kw}


