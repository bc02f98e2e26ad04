"""Netlink counters in network namespaces this test creates: a veth pair, real traffic, and
the agent's NIC and qdisc readers must report the bytes that were sent.

Namespaces and interfaces get unique names and addresses from 198.18.0.0/15 (RFC 2544);
a finalizer deletes them even when the test fails. Needs root (CI runs as root).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from helpers import until
from netkv_agent.agent import Agent
from netkv_agent.nic import NicReader
from netkv_agent.publisher import STREAM_FIELD
from netkv_agent.rtnetlink import RouteSocket
from netkv_agent.settings import AgentSettings

from netkv.adapters.redis_client import connect_redis
from netkv.config import RedisSettings
from netkv.contracts.names import RedisKeys
from netkv.contracts.samples import NicSample, QdiscSample
from netkv.contracts.wire import Batch, decode_batch
from netkv.localservers import RedisServer

if TYPE_CHECKING:  # tests/conftest.py cannot be imported by name: tests/testbed has one too
    from conftest import VethPair

pytestmark = pytest.mark.netns

SENDER = """
import socket, sys, time

n, size, dst = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = bytes(size)
sent = 0
deadline = time.monotonic() + float(sys.argv[4])
while sent < n and time.monotonic() < deadline:
    try:
        s.sendto(payload, (dst, 9))
        sent += 1
    except OSError:
        time.sleep(0.0005)
print(sent)
"""


@pytest.fixture
def veth_pair(make_veth_pair: Callable[[str, str], VethPair]) -> VethPair:
    return make_veth_pair("agent", "198.18.7")


def shape(pair: VethPair, rate: str, burst: str, limit: str) -> None:
    """A tbf root qdisc on A's side of the pair."""
    subprocess.run(["ip", "netns", "exec", pair.ns_a, "tc", "qdisc", "add", "dev", pair.if_a,
                    "root", "tbf", "rate", rate, "burst", burst, "limit", limit],
                   check=True, capture_output=True, timeout=10)


def send(pair: VethPair, count: int, size: int, limit_s: float = 20.0) -> int:
    """Send ``count`` UDP datagrams of ``size`` bytes from A to B; returns how many left."""
    out = subprocess.run(
        ["ip", "netns", "exec", pair.ns_a, sys.executable, "-c", SENDER, str(count),
         str(size), pair.addr_b, str(limit_s)],
        check=True, capture_output=True, text=True, timeout=limit_s + 10)
    return int(out.stdout.strip())


async def test_nic_rates_match_bytes_sent(veth_pair: VethPair) -> None:
    reader_a = NicReader("hA", [veth_pair.if_a], {veth_pair.if_a: 10.0})
    reader_b = NicReader("hB", [veth_pair.if_b])
    async with RouteSocket(netns=veth_pair.ns_a) as ipr_a, \
            RouteSocket(netns=veth_pair.ns_b) as ipr_b:
        before = time.monotonic()
        assert reader_a.read(ipr_a) == [] and reader_b.read(ipr_b) == []
        start = time.monotonic()
        count, size = 3000, 1000
        sent = await asyncio.to_thread(send, veth_pair, count, size)
        await asyncio.sleep(0.05)
        mid = time.monotonic()
        [a] = reader_a.read(ipr_a)
        end = time.monotonic()
        [b] = reader_b.read(ipr_b)
    assert sent == count
    wire = size + 8 + 20 + 14  # UDP, IPv4 and Ethernet headers, as veth counts them
    expected = count * wire
    assert isinstance(a, NicSample) and a.nic == veth_pair.if_a and a.reporter == "hA"
    assert mid - start <= a.window_s <= end - before  # from the first read to the second
    # a few ARP frames may ride along; nothing else crosses this private link
    assert expected <= a.tx_bytes_s * a.window_s <= expected + 2000
    assert count <= a.tx_packets_s * a.window_s <= count + 5
    assert expected <= b.rx_bytes_s * b.window_s <= expected + 2000
    assert a.rx_bytes_s * a.window_s < 200_000  # only ICMP port-unreachables come back
    assert a.capacity_bps == pytest.approx(10e9)  # from config: veth has no speed
    assert a.oper_up and b.oper_up
    assert a.drops_s == 0 and a.errors_s == 0


async def test_agent_in_namespace_reports_shaped_rate_and_backlog(
        veth_pair: VethPair, redis_server: RedisServer) -> None:
    rate_bit = 20_000_000  # tbf at 20 Mbit/s = 2.5 MB/s; its 40 kB queue is smaller than the
    # sender's socket buffer, so the qdisc (not the socket) overflows and counts drops
    shape(veth_pair, "20mbit", "16kb", "40kb")
    settings = AgentSettings(
        agent_id="h000", listen_address="127.0.0.80", mqtt_enabled=False,
        redis=RedisSettings(url=redis_server.url), netns=veth_pair.ns_a,
        fabric_nic=veth_pair.if_a, nic_speed_gbps={veth_pair.if_a: 0.02},
        counter_interval_s=0.25, publish_interval_s=0.2, rdma_enabled=False)
    async with Agent(settings) as agent:
        # ~3 s of UDP offered at far more than 20 Mbit/s
        sent = await asyncio.to_thread(send, veth_pair, 10_000_000, 1400, 3.0)
        # two more counter reads (0.25 s apart) after the flow: its tail is in the samples
        read = agent.stats()["samples_by_kind"].get("nic", 0)
        await until(lambda: agent.stats()["samples_by_kind"].get("nic", 0) >= read + 2, 10.0,
                    what="two NIC reads after the flow")
        stats = agent.stats()
    assert sent > 0 and stats["counter_errors"] == 0
    entries = await _stream(redis_server.url, "h000")
    samples = [s for b in entries for s in b.samples]
    nic = [s for s in samples if isinstance(s, NicSample)]
    qdisc = [s for s in samples if isinstance(s, QdiscSample)]
    assert nic and qdisc
    busy = [s.tx_bytes_s for s in nic if s.tx_bytes_s > 0.5 * rate_bit / 8]
    assert len(busy) >= 4  # the flow lasted ~3 s at a 0.25 s read interval
    mid = sorted(busy)[len(busy) // 2]
    assert mid == pytest.approx(rate_bit / 8, rel=0.15)  # the shaped rate, not the offered
    assert max(s.backlog_bytes for s in qdisc) > 0  # packets queued at the tbf
    assert sum(s.drops_s * s.window_s for s in qdisc) > 0  # and overflowed it
    assert all(s.capacity_bps == pytest.approx(0.02e9) for s in nic)


async def _stream(url: str, agent: str) -> list[Batch]:
    async with connect_redis(RedisSettings(url=url)) as client:
        raw: Any = await client.xrange(RedisKeys().samples_stream(agent))
    return [decode_batch(fields[STREAM_FIELD.encode()]) for _, fields in raw]


async def test_route_socket_agrees_with_pyroute2_inside_the_namespace(veth_pair: VethPair) -> None:
    """The hand-built requests read what pyroute2's generic ones read, in the right netns."""
    from pyroute2 import AsyncIPRoute

    shape(veth_pair, "20mbit", "16kb", "40kb")
    async with RouteSocket(netns=veth_pair.ns_a) as route, \
            AsyncIPRoute(netns=veth_pair.ns_a) as ipr:
        index = route.link_index(veth_pair.if_a)
        assert index is not None and [index] == await ipr.link_lookup(ifname=veth_pair.if_a)
        assert route.link_index(veth_pair.if_b) is None  # B's end lives in the other netns
        assert route.link_index("nosuch0") is None
        stats = route.link_stats64(index)
        [msg] = await ipr.stats("get", ifindex=index, filter_mask=1)
        theirs = msg.get("IFLA_STATS_LINK_64")
        assert stats is not None and {k: int(theirs[k]) for k in stats} == stats
        roots = [m async for m in await ipr.get_qdiscs(index=index)
                 if m["parent"] == 0xFFFFFFFF]
        queue = roots[0].get(("stats2", "TCA_STATS_QUEUE"))
        assert route.root_qdisc(index) == (roots[0]["handle"], queue["backlog"],
                                           queue["qlen"], queue["drops"])
        assert route.root_qdisc(index) is not None and route.root_qdisc(99999) is None
        assert route.link_stats64(99999) is None
