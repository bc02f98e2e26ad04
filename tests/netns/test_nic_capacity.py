"""For engineer F's faults: a NIC shaped slower at run time (a tbf rate change: how the
testbeds emulate a NIC that negotiated a lower rate) and a NIC that goes down are seen in the
oracle's congestion map within about two seconds. Real agent in a network namespace this test
makes (198.18.0.0/15), real redis-server, the real oracle service. Needs root."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from helpers import until
from netkv_agent.agent import Agent
from netkv_agent.settings import AgentSettings
from netkv_oracle.service import OracleService
from netkv_oracle.testkit import oracle_settings

from netkv.config import RedisSettings
from netkv.core.congestion import CongestionMap
from netkv.core.topology_file import parse_topology
from netkv.localservers import RedisServer

if TYPE_CHECKING:
    from conftest import VethPair

pytestmark = [pytest.mark.netns, pytest.mark.faults, pytest.mark.timeout(60)]

TOPO = parse_topology({"fabric": {"nic_gbps": 0.1}, "fat_tree": {}})  # 12.5 MB/s nominal
SEEN_WITHIN_S = 2.5  # "within ~2 s": counter interval 0.25 s + publish 0.2 s + capacity cache 1 s


def tc(pair: VethPair, verb: str, rate: str) -> None:
    subprocess.run(["ip", "netns", "exec", pair.ns_a, "tc", "qdisc", verb, "dev", pair.if_a,
                    "root", "tbf", "rate", rate, "burst", "16kb", "limit", "40kb"],
                   check=True, capture_output=True, timeout=10)


def link_down(pair: VethPair) -> None:
    subprocess.run(["ip", "-n", pair.ns_a, "link", "set", pair.if_a, "down"], check=True,
                   capture_output=True, timeout=10)


async def test_a_nic_shaped_slower_or_down_at_run_time_is_seen_in_the_map(
        make_veth_pair: Callable[[str, str], VethPair], redis_server: RedisServer) -> None:
    pair = make_veth_pair("cap", "198.18.9")
    tc(pair, "add", "40mbit")
    agent_settings = AgentSettings(
        agent_id="h000", listen_address="127.0.0.92", mqtt_enabled=False,
        redis=RedisSettings(url=redis_server.url), netns=pair.ns_a, fabric_nic=pair.if_a,
        counter_interval_s=0.25, publish_interval_s=0.2, rdma_enabled=False)
    settings = oracle_settings(redis_server.url, 1, oracle_id="o1", sample_interval_s=1.0)
    up = TOPO.link_index["h000/nic/up"]
    async with OracleService(settings, TOPO, mqtt=False) as oracle, \
            Agent(agent_settings, TOPO):
        def cmap() -> CongestionMap:  # the builder may swap its map (seeding)
            return oracle.builder.map

        await until(lambda: cmap().capacity[up] == pytest.approx(40e6 / 8), 15)
        assert cmap().link_up[up]
        tc(pair, "change", "10mbit")
        changed = time.monotonic()
        await until(lambda: cmap().capacity[up] == pytest.approx(10e6 / 8), 10)
        slower_s = time.monotonic() - changed
        link_down(pair)
        downed = time.monotonic()
        await until(lambda: not cmap().link_up[up], 10)
        down_s = time.monotonic() - downed
        assert cmap().available()[up] == 0.0  # failed, not healthy
    print(f"tbf 40 -> 10 Mbit/s seen after {slower_s:.2f} s; link down after {down_s:.2f} s")
    assert slower_s <= SEEN_WITHIN_S and down_s <= SEEN_WITHIN_S
