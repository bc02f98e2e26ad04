"""Several real agents on distinct loopback addresses, one real Redis: registration, peers
from the registry, tiered pinglists, RTT samples for every probed pair, a peer leaving, and
the CPU footprint tool."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import until
from netkv_agent.agent import Agent, run_agents
from netkv_agent.footprint import measure_agent_cpu
from netkv_agent.publisher import STREAM_FIELD
from netkv_agent.settings import AgentSettings

from netkv.adapters.redis_client import connect_redis
from netkv.config import RedisSettings
from netkv.contracts.names import RedisKeys
from netkv.contracts.registration import LinkPair, decode_registration, read_registry
from netkv.contracts.samples import NicSample, RttSample
from netkv.contracts.wire import Batch, decode_batch
from netkv.core.topology_file import parse_topology
from netkv.localservers import RedisServer

pytestmark = pytest.mark.integration
KEYS = RedisKeys()
TOPO = parse_topology({"fat_tree": {"pods": 2, "leaves_per_pod": 2, "hosts_per_leaf": 2}})


def settings(i: int, url: str) -> AgentSettings:
    host = TOPO.hosts[i]
    return AgentSettings(agent_id=host.name, listen_address=f"127.0.2.{10 + i}",
                         redis=RedisSettings(url=url), mqtt_enabled=False,
                         publish_interval_s=0.2, registry_refresh_s=0.5, heartbeat_ttl_s=2,
                         probe_interval_leaf_s=0.1, probe_interval_pod_s=0.2,
                         probe_interval_core_s=0.4, fabric_nic="lo",
                         nic_speed_gbps={"lo": 10.0}, rdma_enabled=False)


async def batches(client: Any, agent: str) -> list[Batch]:
    raw = await client.xrange(KEYS.samples_stream(agent))
    return [decode_batch(fields[STREAM_FIELD.encode()]) for _, fields in raw]


async def test_mesh_of_eight_agents(redis_server: RedisServer) -> None:
    stats = await run_agents([settings(i, redis_server.url) for i in range(8)], TOPO, 3.0)
    assert all(s["pinglist"] == 7 for s in stats)  # 1 leaf + 2 pod + 4 core peers each
    assert all(s["replies"] > 0 and s["dropped_batches"] == 0 for s in stats)
    async with connect_redis(RedisSettings(url=redis_server.url)) as client:
        raw = await read_registry(client, KEYS)
        regs = {k: decode_registration(v) for k, v in raw.items()}
        assert set(regs) == {h.name for h in TOPO.hosts}
        assert len({(r.address, r.echo_port) for r in regs.values()}) == 8
        assert regs["h003"].links == {"lo": LinkPair("h003/nic/up", "h003/nic/down")}
        for host in TOPO.hosts:
            samples = [s for b in await batches(client, host.name) for s in b.samples]
            assert samples and all(s.reporter == host.name for s in samples)
            rtt = [s for s in samples if isinstance(s, RttSample)]
            peers = {s.peer for s in rtt}
            assert peers == {h.name for h in TOPO.hosts} - {host.name}
            assert all(s.lost <= s.sent and s.min_s <= s.p50_s <= s.p99_s for s in rtt)
            assert any(isinstance(s, NicSample) and s.capacity_bps == 10e9
                       for s in samples)


async def test_a_leaving_peer_is_dropped_from_pinglists(redis_server: RedisServer) -> None:
    # h000 and h001 share a leaf
    async with Agent(settings(0, redis_server.url), TOPO) as first:
        async with Agent(settings(1, redis_server.url), TOPO):
            await until(lambda: "h001" in first.prober.peers, 5.0)
            await until(lambda: first.stats()["replies"] > 3, 5.0)
        # h001 stopped cleanly (its heartbeat is gone): h000 stops probing it
        await until(lambda: "h001" not in first.prober.peers, 5.0)
        assert first.peers.keys() == {"h000"}


async def test_footprint_tool_measures_a_child_agent(redis_server: RedisServer) -> None:
    base = AgentSettings(probe_interval_leaf_s=0.1)
    result = await measure_agent_cpu(4, 1.0, redis_url=redis_server.url, warmup_s=1.5,
                                     base=base)
    assert result["peers"] == 4 and result["pinglist"] == 4  # 5 hosts in one leaf of 8
    assert 0 < result["cpu_fraction"] < 1
    assert result["probes_per_s"] > 0 and result["echo_ticks_per_s"] > 0
    assert result["probe_bytes_per_s"] > 0

