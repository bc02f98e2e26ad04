"""Issue 3, what must show (2): a congested link in namespaces this test creates shows up in
the oracle's map and estimates, and clears again.

Two namespaces joined by a veth pair, A's side shaped with ``tbf`` to 20 Mbit/s (addresses in
198.18.0.0/15, unique names, deleted by the finalizer). Host h000's agent reads A's
interface, h001's agent B's; both publish to a real redis-server, the real oracle builds the
map. A UDP flow from A to B offered far above the shaped rate must appear as utilisation near
20 Mbit/s on ``h000/nic/up``, the estimate h000 -> h001 must rise at least 2x over idle, and
fall back within a few intervals after the flow stops. Needs root (CI runs as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from helpers import until
from netkv_agent.agent import Agent
from netkv_agent.settings import AgentSettings
from netkv_oracle.service import OracleService
from netkv_oracle.testkit import get_json, oracle_settings

from netkv.config import MqttSettings, RedisSettings
from netkv.core.topology_file import parse_topology
from netkv.localservers import MosquittoServer, RedisServer

if TYPE_CHECKING:  # tests/conftest.py cannot be imported by name: tests/testbed has one too
    from conftest import VethPair


pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

RATE_BYTES_S = 20e6 / 8  # tbf 20 Mbit/s
INTERVAL_S = 0.25

FLOOD = """
import socket, sys, time

dst, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = bytes(1400)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        s.sendto(payload, (dst, 9))
    except OSError:
        time.sleep(0.0005)
"""


@pytest.fixture
def veth(make_veth_pair: Callable[[str, str], VethPair]) -> VethPair:
    """A's side shaped with tbf to 20 Mbit/s."""
    pair = make_veth_pair("orc", "198.18.9")
    subprocess.run(["ip", "netns", "exec", pair.ns_a, "tc", "qdisc", "add", "dev", pair.if_a,
                    "root", "tbf", "rate", "20mbit", "burst", "16kb", "limit", "40kb"],
                   check=True, capture_output=True, timeout=10)
    return pair


def agent(host: str, address: str, *, ns: str, ifname: str, redis: RedisServer,
          mqtt: MosquittoServer) -> AgentSettings:
    return AgentSettings(
        agent_id=host, listen_address=address, redis=RedisSettings(url=redis.url),
        mqtt=MqttSettings(port=mqtt.port), mqtt_enabled=False, netns=ns, fabric_nic=ifname,
        nic_speed_gbps={ifname: 0.02}, counter_interval_s=INTERVAL_S,
        publish_interval_s=0.2, probe_interval_leaf_s=0.2, rtt_window_s=0.5,
        rdma_enabled=False, registry_refresh_s=0.5)


async def test_saturated_veth_shows_in_map_and_estimates(
        veth: VethPair, redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    topology = parse_topology({
        "fabric": {"nic_gbps": 0.02},
        "hosts": [{"name": "h000", "leaf": "l0", "pod": "p0"},
                  {"name": "h001", "leaf": "l0", "pod": "p0"}]})
    settings = oracle_settings(redis_server.url, mosquitto_server.port, oracle_id="n1",
                               sample_interval_s=INTERVAL_S, tomography=False)
    up, down = topology.link_index["h000/nic/up"], topology.link_index["h001/nic/down"]
    nbytes = "10000000"  # 10 MB: 4 s at the shaped rate when idle
    async with contextlib.AsyncExitStack() as stack:
        oracle = await stack.enter_async_context(OracleService(settings, topology))
        for host, addr, ns, ifname in (("h000", "127.0.0.90", veth.ns_a, veth.if_a),
                                       ("h001", "127.0.0.91", veth.ns_b, veth.if_b)):
            await stack.enter_async_context(Agent(
                agent(host, addr, ns=ns, ifname=ifname, redis=redis_server,
                      mqtt=mosquitto_server), topology))

        async def cost() -> dict[str, float]:
            status, body = await get_json(oracle.port, "/v1/cost", src="h000", dst="h001",
                                          bytes=nbytes)
            assert status == 200, body
            result: dict[str, float] = body
            return result

        def both_measured() -> bool:
            return bool((oracle.builder.map.link_confidence()[[up, down]] == 1.0).all())

        await until(both_measured, 10)
        idle = await cost()
        assert idle["confidence"] > 0
        flood = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", veth.ns_a, sys.executable, "-c", FLOOD, veth.addr_b, "4")
        try:
            await until(lambda: oracle.builder.map.util[up] > 0.5 * RATE_BYTES_S, 5, 0.05)
            await asyncio.sleep(3 * INTERVAL_S)  # a few full windows of saturation
            util = float(oracle.builder.map.util[up])
            busy = await cost()
        finally:
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(flood.wait(), 10)
        stopped = time.monotonic()
        print(f"util {util:.0f} B/s of {RATE_BYTES_S:.0f}; idle {idle['seconds']:.3f} s, "
              f"busy {busy['seconds']:.3f} s ({busy['seconds'] / idle['seconds']:.1f}x)")
        assert util == pytest.approx(RATE_BYTES_S, rel=0.15), "utilisation near the tbf rate"
        assert busy["seconds"] >= 2 * idle["seconds"], (busy, idle)
        assert busy["confidence"] > 0

        async def recovered() -> bool:
            return (await cost())["seconds"] <= 1.2 * idle["seconds"]

        await until(recovered, 5, 0.05)
        print(f"back to idle {time.monotonic() - stopped:.2f} s after the flow stopped")
        assert time.monotonic() - stopped <= 5 * INTERVAL_S + 0.5, "fell back too slowly"
