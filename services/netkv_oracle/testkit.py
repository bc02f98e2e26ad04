"""Helpers for the oracle's tests and benchmarks: settings for local fixture servers, a batch
writer that speaks the agents' wire format (XADD to an agent's stream), and HTTP, metrics
and MQTT probes. Kept in the package so integration tests and `netkv bench` share them."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import aiomqtt

from netkv.config import MqttSettings, RedisSettings
from netkv.contracts.names import MqttTopics, RedisKeys
from netkv.contracts.samples import NicSample, RttSample, Sample
from netkv.contracts.wire import Batch, encode_batch
from netkv_oracle.settings import OracleSettings

KEYS = RedisKeys()


def oracle_settings(redis_url: str, mqtt_port: int, **kw: Any) -> OracleSettings:
    base: dict[str, Any] = {
        "redis": RedisSettings(url=redis_url, timeout_s=1.0),
        "mqtt": MqttSettings(port=mqtt_port, keepalive_s=5),
        "http_port": 0, "sample_interval_s": 0.2, "publish_interval_s": 0.05,
        "republish_s": 0.5, "discover_interval_s": 0.2, "claim_idle_s": 0.5,
        "leader_ttl_s": 1.0, "read_block_ms": 50}
    base.update(kw)
    return OracleSettings(**base)


def nic(host: str, tx: float, rx: float = 0.0, ts: float | None = None,
        name: str = "eth0") -> NicSample:
    return NicSample(reporter=host, nic=name, ts=ts or time.time(), window_s=0.2,
                     tx_bytes_s=tx, rx_bytes_s=rx, tx_packets_s=1.0, rx_packets_s=1.0,
                     drops_s=0.0, errors_s=0.0, capacity_bps=0.0, oper_up=True)


def rtt(host: str, peer: str, srtt: float = 1e-4, ts: float | None = None) -> RttSample:
    return RttSample(reporter=host, peer=peer, ts=ts or time.time(), window_s=0.2, sent=10,
                     lost=0, srtt_s=srtt, p50_s=srtt, p99_s=srtt, min_s=srtt)


_seq = 0


def batch(agent: str, *samples: Sample) -> bytes:
    global _seq  # noqa: PLW0603 - a test-wide sequence number
    _seq += 1
    return encode_batch(Batch(agent, _seq, time.time(), tuple(samples)))


async def xadd(redis: Any, agent: str, payload: bytes | dict[str, bytes]) -> None:
    fields = payload if isinstance(payload, dict) else {"b": payload}
    await redis.xadd(KEYS.samples_stream(agent), fields, maxlen=1000, approximate=True)


async def get_json(port: int, path: str, **params: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{port}{path}", params=params) as r:
        return r.status, await r.json(content_type=None)


async def post_json(port: int, path: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s, \
            s.post(f"http://127.0.0.1:{port}{path}", data=data,
                   headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json(content_type=None)


async def metric(port: int, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                   if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


async def retained_version(mqtt_port: int, timeout_s: float = 3.0) -> dict[str, Any]:
    """The retained map announcement, as a fresh subscriber sees it."""
    async with aiomqtt.Client("127.0.0.1", mqtt_port) as client:
        await client.subscribe(MqttTopics().map_version, qos=1)
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                out: dict[str, Any] = json.loads(payload)
                return out
    raise AssertionError("no retained announcement")
