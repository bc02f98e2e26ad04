"""The fabric plan (pure): every topology link maps to one shaped port, rates are scaled,
addresses come from 198.18.0.0/15, hot spots cross exactly the link they name."""

from __future__ import annotations

import ipaddress

import pytest

from netkv.core.topology import Topology
from netkv.errors import InputError
from netkv.testbed.background import Schedule, core_schedule, flow_endpoints
from netkv.testbed.fabric import FabricPlan

pytestmark = pytest.mark.unit
BENCHMARK_NET = ipaddress.IPv4Network("198.18.0.0/15")


def test_every_switched_link_has_exactly_one_shaped_port(small_topology: Topology) -> None:
    plan = FabricPlan.of(small_topology, "nkvtest-")
    switched = {lk.name for lk in small_topology.links if not lk.name.endswith("/fabric")}
    assert set(plan.link_ports) == switched
    ports = list(plan.link_ports.values())
    assert len(set(ports)) == len(ports)  # no two links share a qdisc


def test_rates_are_scaled_and_addresses_are_benchmark_addresses(
        small_topology: Topology) -> None:
    plan = FabricPlan.of(small_topology, "nkvtest-", scale=1e-4)
    assert plan.rate_bps("h000/nic/up") == pytest.approx(40e6)
    assert plan.rate_bps("pod0/up") == pytest.approx(80e6)  # 4 hosts x 400 / oversub 2
    addrs = [*plan.host_addr.values(), *plan.tenant_addr.values(), *plan.mgmt_addr.values()]
    assert len(set(addrs)) == len(addrs)
    assert all(ipaddress.IPv4Address(a) in BENCHMARK_NET for a in addrs)
    data = plan.scaled_topology_data()
    assert data["fabric"]["nic_gbps"] == pytest.approx(0.04)
    assert data["fabric"]["pod_oversubscription"] == pytest.approx(2.0)
    assert data["hosts"][0]["address"] == plan.host_addr["h000"]


def test_hot_spot_flows_cross_only_the_named_link(small_topology: Topology) -> None:
    plan = FabricPlan.of(small_topology, "nkvtest-")
    assert flow_endpoints(plan, "leaf0.1/up") == ("leaf0.1", "pod0")
    assert flow_endpoints(plan, "pod1/down") == ("core", "pod1")
    with pytest.raises(InputError, match="not a leaf or pod link"):
        flow_endpoints(plan, "h000/nic/up")


def test_default_schedule_congests_the_core_throughout(small_topology: Topology) -> None:
    plan = FabricPlan.of(small_topology, "nkvtest-")
    schedule = core_schedule(plan, 30.0)
    for t in (0.0, 14.9, 29.9):
        assert {"pod0/up", "pod1/up", "pod0/down", "pod1/down"} <= schedule.links(t)
    leaf_spots = [h for h in schedule.hot_spots if h.link.startswith("leaf")]
    assert len({h.link for h in leaf_spots}) > 1  # the leaf hot spot moves
    assert schedule.duration_s == pytest.approx(30.0)
    assert plan.crosses("h000", "h007", "pod0/up")
    assert not plan.crosses("h000", "h001", "pod0/up")


def test_schedule_file_is_validated() -> None:
    with pytest.raises(InputError, match="end_s"):
        Schedule.parse({"hot_spots": [{"link": "pod0/up", "start_s": 5, "end_s": 1}]})
    with pytest.raises(InputError, match="flows"):
        Schedule.parse({"hot_spots": [{"link": "pod0/up", "flows": 0}]})
