"""The optional active bandwidth probe on loopback: the burst respects its rate cap, the sink
is bounded, and two agents with the probe enabled measure each other."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from helpers import until
from netkv_agent.agent import Agent
from netkv_agent.bandwidth import MAX_CONNECTIONS, bandwidth_sink, burst
from netkv_agent.settings import AgentSettings

from netkv.config import RedisSettings
from netkv.localservers import RedisServer

pytestmark = pytest.mark.integration


async def test_burst_is_rate_capped_and_fully_received() -> None:
    async with bandwidth_sink("127.0.3.1") as (sink, port):
        cap = 4e6  # 4 MB/s (32 Mbit/s)
        result = await burst("p", "127.0.3.1", port, 2_000_000, cap)
        await until(lambda: sink.received >= 2_000_000, 5.0, what="the burst received")
    assert result.nbytes == 2_000_000
    assert result.bytes_s <= cap * 1.05  # never above the cap...
    assert result.bytes_s >= cap * 0.5  # ...and loopback is far faster, so close to it
    assert sink.received == 2_000_000


async def test_sink_refuses_beyond_its_connection_cap() -> None:
    async with bandwidth_sink("127.0.3.2") as (sink, port):
        conns = [await asyncio.open_connection("127.0.3.2", port)
                 for _ in range(MAX_CONNECTIONS + 2)]
        await until(lambda: sink.refused + sink.active == MAX_CONNECTIONS + 2, 5.0,
                    what="every connection accepted or refused")
        assert sink.refused == 2 and sink.active == MAX_CONNECTIONS
        for _, writer in conns:
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for _, writer in conns))
        await until(lambda: sink.active == 0, 5.0, what="the sink's connections closed")
    assert sink.active == 0


async def test_agents_probe_each_other_when_enabled(redis_server: RedisServer) -> None:
    def settings(name: str, address: str) -> AgentSettings:
        return AgentSettings(agent_id=name, listen_address=address, mqtt_enabled=False,
                             redis=RedisSettings(url=redis_server.url),
                             bandwidth_probe_enabled=True, bandwidth_probe_interval_s=0.3,
                             bandwidth_probe_bytes=200_000, bandwidth_probe_rate_mbps=16.0)

    async with Agent(settings("h001", "127.0.3.11")) as a, \
            Agent(settings("h002", "127.0.3.12")):
        assert a.registration().bandwidth_port > 0
        await until(lambda: a.stats()["bandwidth_probes"], 10.0, what="a bandwidth probe")
        probes: list[dict[str, Any]] = a.stats()["bandwidth_probes"]
    assert probes[0]["peer"] == "h002" and probes[0]["bytes"] == 200_000
    assert 0 < probes[0]["bytes_s"] <= 2e6 * 1.05


async def test_disabled_by_default(redis_server: RedisServer) -> None:
    s = AgentSettings(agent_id="h003", listen_address="127.0.3.13", mqtt_enabled=False,
                      redis=RedisSettings(url=redis_server.url))
    async with Agent(s) as agent:
        assert agent.registration().bandwidth_port == 0
        assert "bandwidth" not in agent._tasks
