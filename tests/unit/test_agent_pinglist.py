"""Pinglists: dense within the leaf, sparse and rotating beyond, linear total growth."""

from __future__ import annotations

import pytest
from netkv_agent.pinglist import build_pinglist
from netkv_agent.settings import AgentSettings

from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology

pytestmark = pytest.mark.unit


def fat_tree(pods: int, leaves: int, hosts: int) -> Topology:
    return parse_topology({"fat_tree": {"pods": pods, "leaves_per_pod": leaves,
                                        "hosts_per_leaf": hosts}})


def endpoints(topo: Topology) -> dict[str, tuple[str, int]]:
    return {h.name: (f"127.0.{i // 250}.{i % 250 + 2}", 7000) for i, h in
            enumerate(topo.hosts)}


def test_tiers_and_intervals() -> None:
    topo = fat_tree(pods=3, leaves=3, hosts=4)
    s = AgentSettings(agent_id="h000", pod_fanout=1, core_fanout=3)
    targets = build_pinglist(s, topo, endpoints(topo), now=0.0)
    by_interval: dict[float, list[str]] = {}
    for t in targets:
        by_interval.setdefault(t.interval_s, []).append(t.name)
    me = topo.hosts[0]
    leaf = [h.name for h in topo.hosts if h.leaf == me.leaf and h.name != "h000"]
    assert sorted(by_interval[s.probe_interval_leaf_s]) == sorted(leaf)
    pod = by_interval[s.probe_interval_pod_s]
    leaves = {topo.hosts[topo.host_index[n]].leaf for n in pod}
    assert len(pod) == 2 and len(leaves) == 2 and me.leaf not in leaves  # one per other leaf
    core = by_interval[s.probe_interval_core_s]
    pods = {topo.hosts[topo.host_index[n]].pod for n in core}
    assert len(core) == 3 and len(pods) == 2 and me.pod not in pods  # both other pods reached
    assert "h000" not in {t.name for t in targets}


def test_only_registered_peers_are_probed() -> None:
    topo = fat_tree(1, 1, 4)
    eps = endpoints(topo)
    del eps["h002"]
    eps["h003"] = ("127.0.0.9", 0)  # registered without an echo port: not probeable
    names = {t.name for t in build_pinglist(AgentSettings(agent_id="h000"), topo, eps, 0.0)}
    assert names == {"h001"}


def test_rotation_covers_every_remote_peer() -> None:
    topo = fat_tree(pods=4, leaves=2, hosts=4)
    s = AgentSettings(agent_id="h000", pod_fanout=1, core_fanout=2, pinglist_rotate_s=10)
    seen: set[str] = set()
    lists = []
    for epoch in range(60):
        targets = build_pinglist(s, topo, endpoints(topo), now=epoch * 10.0 + 1)
        lists.append(tuple(t.name for t in targets))
        seen |= {t.name for t in targets}
    assert seen == {h.name for h in topo.hosts} - {"h000"}
    assert len(set(lists)) > 1  # it does rotate
    # stable within an epoch
    a = build_pinglist(s, topo, endpoints(topo), now=101.0)
    b = build_pinglist(s, topo, endpoints(topo), now=109.0)
    assert a == b


def test_probe_rate_grows_linearly_with_hosts() -> None:
    """Per-agent probes/s is bounded by the fabric shape, so the total is O(hosts)."""
    s = AgentSettings(agent_id="h000")

    def total_rate(pods: int) -> float:
        topo = fat_tree(pods=pods, leaves=4, hosts=8)
        eps = endpoints(topo)
        rate = 0.0
        for host in topo.hosts:
            mine = AgentSettings(agent_id=host.name)
            rate += sum(1 / t.interval_s for t in build_pinglist(mine, topo, eps, 0.0))
        return rate

    small, large = total_rate(2), total_rate(8)  # 64 vs 256 hosts
    assert large / small == pytest.approx(4.0, rel=0.15)  # linear, not 16x
    del s


def test_switch_agent_has_no_pinglist_and_no_topology_probes_all() -> None:
    topo = fat_tree(1, 2, 2)
    eps = endpoints(topo)
    assert build_pinglist(AgentSettings(agent_id="leaf0.0"), topo, eps, 0.0) == []
    free = build_pinglist(AgentSettings(agent_id="h000", max_peers=2), None, eps, 0.0)
    assert len(free) == 2 and all(t.interval_s == 0.1 for t in free)
