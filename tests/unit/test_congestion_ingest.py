"""From accepted samples to the congestion map: identity checks, registrations, the builder."""

from __future__ import annotations

from typing import Any, cast

import msgpack
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from netkv_oracle.builder import MapBuilder
from netkv_oracle.identity import (
    Ownership,
    RejectedError,
    agent_acl_rules,
    binding_from_registration,
    stream_owner,
)
from netkv_oracle.ingest import Ingestor
from netkv_oracle.metrics import OracleMetrics

from netkv.contracts.names import RedisKeys
from netkv.contracts.registration import LinkPair, Registration, encode_registration
from netkv.contracts.samples import NicSample, QdiscSample, RdmaSample, RttSample, Sample
from netkv.contracts.wire import Batch, decode_batch, encode_batch
from netkv.core.congestion import MapParams
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology

pytestmark = pytest.mark.unit

NOW = 1_700_000_000.0


def topo() -> Topology:
    return parse_topology({"fabric": {"nic_gbps": 8}, "fat_tree": {}})


def nic(reporter: str, name: str = "eth0", *, tx: float = 1.0, rx: float = 2.0,
        ts: float = NOW, speed: float = 0.0, up: bool = True) -> NicSample:
    """``speed`` in bytes/s (sent as ``capacity_bps``, bits/s)."""
    return NicSample(reporter=reporter, nic=name, ts=ts, window_s=1.0, tx_bytes_s=tx,
                     rx_bytes_s=rx, tx_packets_s=0.0, rx_packets_s=0.0, drops_s=0.0,
                     errors_s=0.0, capacity_bps=speed * 8, oper_up=up)


def rdma(reporter: str, tx: float, rx: float) -> RdmaSample:
    return RdmaSample(reporter=reporter, device="mlx5_0", port=1, ts=NOW, window_s=1.0,
                      tx_bytes_s=tx, rx_bytes_s=rx, cnp_sent_s=0.0, cnp_handled_s=0.0,
                      ecn_marked_s=0.0, xmit_wait_s=0.0)


def rtt(reporter: str, peer: str, sent: int = 10, lost: int = 0) -> RttSample:
    return RttSample(reporter=reporter, peer=peer, ts=NOW, window_s=1.0, sent=sent,
                     lost=lost, srtt_s=0.002, p50_s=0.002, p99_s=0.003, min_s=0.001)


def batch(agent: str, *samples: Sample) -> Batch:
    return Batch(agent, 1, NOW, samples)


def registration(agent: str, links: dict[str, LinkPair],
                 rdma_links: dict[str, LinkPair] | None = None) -> bytes:
    return encode_registration(Registration(
        agent=agent, address="127.0.0.1", echo_port=1, version="0", started=NOW,
        nics=tuple(links), links=links, rdma=rdma_links or {}))


@pytest.mark.parametrize(("agent", "b", "reason"), [
    ("h001", batch("h000", nic("h000")), "wrong_agent"),
    ("h000", batch("h000", nic("h001")), "wrong_reporter"),
    ("h000", batch("h000", nic("h000", name="h001/nic/up")), "foreign_link"),
    ("h000", batch("h000", rtt("h000", "h000")), "unknown_peer"),
    ("h000", batch("h000", rtt("h000", "h999")), "unknown_peer"),
    ("spine9", batch("spine9", nic("spine9", name="up")), "unknown_agent"),
    ("leaf0.0", batch("leaf0.0", nic("leaf0.0", name="swp3")), "unregistered"),
    ("leaf0.0", batch("leaf0.0", nic("leaf0.0", name="up")), "unregistered"),
    ("leaf0.0", batch("leaf0.0", rdma("leaf0.0", 1, 1)), "foreign_link"),
    ("leaf0.0", batch("leaf0.0", rtt("leaf0.0", "h000")), "unknown_peer"),
])
def test_ownership_rejects_what_an_agent_does_not_own(agent: str, b: Batch,
                                                      reason: str) -> None:
    with pytest.raises(RejectedError) as info:
        Ownership(topo()).check(b, agent)
    assert info.value.reason == reason


def test_ownership_accepts_own_links() -> None:
    own = Ownership(topo())
    own.check(batch("h000", nic("h000"), rtt("h000", "h007"), rdma("h000", 1, 1)), "h000")
    strict = Ownership(topo(), require_registered_nics=True)
    with pytest.raises(RejectedError):
        strict.check(batch("h000", nic("h000")), "h000")


def test_registration_binds_interfaces_and_refuses_foreign_links() -> None:
    t = topo()
    good = registration("h000", {"eth0": LinkPair("h000/nic/up", "h000/nic/down")})
    binding = binding_from_registration(t, "h000", good)
    assert binding.links["eth0"] == (t.link_index["h000/nic/up"],
                                      t.link_index["h000/nic/down"])
    steal = registration("h000", {"eth0": LinkPair("h001/nic/up", "h000/nic/down")})
    with pytest.raises(RejectedError, match="h001/nic/up") as info:
        binding_from_registration(t, "h000", steal)
    assert info.value.reason == "bad_registration"
    with pytest.raises(RejectedError, match="names"):
        binding_from_registration(t, "h001", good)  # h000's entry under h001's field
    with pytest.raises(RejectedError):
        binding_from_registration(t, "h000", b"\xc1garbage")
    own = Ownership(t, bindings={"h000": binding})
    with pytest.raises(RejectedError):  # a registered agent reports only its interfaces
        own.check(batch("h000", nic("h000", name="eth1")), "h000")


def test_stream_owner_and_acl_rules() -> None:
    keys = RedisKeys()
    assert stream_owner(keys, keys.samples_stream("h003")) == "h003"
    assert stream_owner(keys, "netkv:{s0}:samples:h003") in (None, "h003")
    assert stream_owner(keys, "other:{s1}:samples:h003") is None
    assert stream_owner(keys, keys.map_snapshot) is None
    rules = agent_acl_rules(keys, "h003", "pw")
    assert f"~{keys.samples_stream('h003')}" in rules and ">pw" in rules
    assert not any(r.startswith("~") and "h004" in r for r in rules)


def builder(t: Topology) -> MapBuilder:
    return MapBuilder(t, MapParams(fresh_s=1.0, stale_s=3.0), clock=lambda: NOW)


def test_builder_maps_nic_rdma_and_qdisc_samples_to_links() -> None:
    t = topo()
    b = builder(t)
    own = Ownership(t)
    up, down = t.link_index["h002/nic/up"], t.link_index["h002/nic/down"]
    b.apply("h002", (nic("h002", tx=1e8, rx=2e8),), NOW, own)
    assert (b.map.util[up], b.map.util[down]) == (1e8, 2e8)
    # RDMA traffic bypasses the netdev counters: the link carries the larger of the two.
    b.apply("h002", (rdma("h002", tx=5e8, rx=1e7),), NOW, own)
    assert (b.map.util[up], b.map.util[down]) == (5e8, 2e8)
    # Two interfaces on one link add up; a reported speed only lowers capacity.
    b.apply("h002", (nic("h002", name="eth1", tx=3e8, rx=0.0, speed=5e8),), NOW, own)
    assert b.map.util[up] == 5e8 and b.map.capacity[up] == 5e8
    b.apply("h002", (QdiscSample(reporter="h002", nic="eth0", ts=NOW, window_s=1.0,
                                 backlog_bytes=5e6, backlog_packets=10.0, drops_s=0.0),),
            NOW, own)
    assert b.map.queue_s[up] == pytest.approx(5e6 / 5e8)
    assert b.changed and b.map.hosts_alive(NOW)[2]


def test_builder_follows_registered_bindings() -> None:
    t = topo()
    b = builder(t)
    binding = binding_from_registration(t, "h002", registration(
        "h002", {"ens1": LinkPair("h002/nic/up", "h002/nic/down")}))
    own = Ownership(t, bindings={"h002": binding})
    b.apply("h002", (nic("h002", name="ens1", tx=7.0, rx=9.0),), NOW, own)
    assert b.map.util[t.link_index["h002/nic/up"]] == 7.0
    assert b.map.util[t.link_index["h002/nic/down"]] == 9.0


def test_builder_clamps_future_timestamps_and_drops_stale_sources() -> None:
    t = topo()
    b = builder(t)
    own = Ownership(t)
    up = t.link_index["h001/nic/up"]
    b.apply("h001", (nic("h001", tx=5.0, ts=NOW + 3600),), NOW, own)
    assert b.map.updated_ts[up] == NOW  # a fast clock cannot buy freshness
    b.apply("h001", (nic("h001", name="old", tx=100.0, ts=NOW - 10),), NOW, own)
    assert b.map.util[up] == 5.0  # the stale interface no longer counts


def switch_ownership(t: Topology) -> Ownership:
    """leaf0.0 registered with uplink port swp9 and pod0 with a LAG of two ports."""
    leaf = registration("leaf0.0", {"swp9": LinkPair("leaf0.0/up", "leaf0.0/down")})
    pod = registration("pod0", {"ae0": LinkPair("pod0/up", "pod0/down"),
                                "ae1": LinkPair("pod0/up", "pod0/down")})
    return Ownership(t, bindings={
        "leaf0.0": binding_from_registration(t, "leaf0.0", leaf),
        "pod0": binding_from_registration(t, "pod0", pod)})


def test_switch_ports_are_translated_through_the_registration() -> None:
    t = topo()
    own = switch_ownership(t)
    own.check(batch("leaf0.0", nic("leaf0.0", name="swp9"),
                    QdiscSample(reporter="leaf0.0", nic="swp9", ts=NOW, window_s=1.0,
                                backlog_bytes=1, backlog_packets=1, drops_s=0.0)),
              "leaf0.0")
    assert own.nic_links("leaf0.0", "swp9") == (t.link_index["leaf0.0/up"],
                                                 t.link_index["leaf0.0/down"])
    for name in ("up", "down", "swp1", "leaf0.0/up"):  # not registered: not its port
        with pytest.raises(RejectedError) as info:
            own.check(batch("leaf0.0", nic("leaf0.0", name=name)), "leaf0.0")
        assert info.value.reason == "foreign_link"
    with pytest.raises(RejectedError) as info:  # pod0's port on leaf0.0's stream
        own.check(batch("leaf0.0", nic("leaf0.0", name="ae0")), "leaf0.0")
    assert info.value.reason == "foreign_link"


@pytest.mark.parametrize("links", [
    {"swp9": LinkPair("leaf0.1/up", "leaf0.1/down")},  # a sibling leaf's links
    {"swp9": LinkPair("leaf0.0/up", "pod0/down")},  # its parent's link as rx
    {"swp9": LinkPair("leaf0.0/up", "h000/nic/up")},  # a host's link
    {"swp9": LinkPair("leaf0.0/up", "leaf0.0/sideways")},  # no such link
])
def test_switch_registration_claiming_links_it_does_not_own_is_refused(
        links: dict[str, LinkPair]) -> None:
    with pytest.raises(RejectedError) as info:
        binding_from_registration(topo(), "leaf0.0", registration("leaf0.0", links))
    assert info.value.reason == "bad_registration"


def test_builder_switch_agent_and_rtt_loss() -> None:
    t = topo()
    b = builder(t)
    own = switch_ownership(t)
    b.apply("leaf0.0", (nic("leaf0.0", name="swp9", tx=4e8, rx=3e8),), NOW, own)
    assert b.map.util[t.link_index["leaf0.0/up"]] == 4e8
    assert b.map.util[t.link_index["leaf0.0/down"]] == 3e8
    b.apply("pod0", (nic("pod0", name="ae0", tx=1e8, rx=2e8),
                     nic("pod0", name="ae1", tx=1e8, rx=2e8)), NOW, own)  # a LAG adds up
    assert b.map.util[t.link_index["pod0/up"]] == 2e8
    assert b.map.util[t.link_index["pod0/down"]] == 4e8
    b.apply("h000", (rtt("h000", "h005"),), NOW, own)
    b.apply("h000", (rtt("h000", "h005", sent=5, lost=5),), NOW, own)
    pair = b.map.pairs[(0, 5)]
    assert pair.loss == 1.0 and pair.srtt_s == 0.002


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=512) | st.builds(
    msgpack.packb, st.dictionaries(
        st.sampled_from(["v", "agent", "seq", "ts", "samples", "x"]),
        st.none() | st.integers(-5, 5) | st.floats() | st.text(max_size=6)
        | st.lists(st.dictionaries(st.sampled_from(["k", "reporter", "nic", "ts"]),
                                   st.text(max_size=4) | st.floats(), max_size=4),
                   max_size=3), max_size=6)))
@example(payload=encode_batch(batch("h001", rtt("h001", "h002"))))  # accepted, every run
def test_ingest_never_raises_on_hostile_entries(payload: bytes) -> None:
    t = topo()
    metrics = OracleMetrics()
    ingestor = Ingestor(cast(Any, None), RedisKeys(), "c", builder(t), ownership=Ownership(t),
                        metrics=metrics)
    stream = RedisKeys().samples_stream("h001")
    accepted = ingestor.handle(stream, {b"batch": payload}, NOW)

    def total(name: str) -> float:
        return sum(s.value for f in metrics.registry.collect() for s in f.samples
                   if s.name == name)

    rejected = total("netkv_samples_rejected_total")
    assert accepted or rejected == 1
    if accepted:  # a valid batch of this stream's own agent, applied whole and counted
        batch = decode_batch(payload)
        assert batch.agent == "h001" and rejected == 0
        assert total("netkv_batches_ingested_total") == 1
        assert total("netkv_samples_ingested_total") == len(batch.samples)
    else:  # rejected with a reason label, and nothing of it applied
        [reason] = [s.labels["reason"] for f in metrics.registry.collect() for s in f.samples
                    if s.name == "netkv_samples_rejected_total" and s.value == 1]
        assert reason
        assert total("netkv_batches_ingested_total") == 0
        assert total("netkv_samples_ingested_total") == 0


@pytest.mark.faults
def test_reported_capacity_is_min_of_nominal_and_reported_and_a_down_nic_is_failed() -> None:
    t = topo()  # 8 Gb/s NICs: 1e9 bytes/s nominal
    b = builder(t)
    own = Ownership(t)
    up = t.link_index["h004/nic/up"]
    nominal = float(t.capacity[up])
    b.apply("h004", (nic("h004", tx=1e8, speed=4 * nominal),), NOW, own)
    assert b.map.capacity[up] == nominal  # a faster report never raises capacity
    b.apply("h004", (nic("h004", tx=1e8, speed=nominal / 4, ts=NOW + 0.1),), NOW + 0.1, own)
    assert b.map.capacity[up] == nominal / 4  # negotiated (or shaped) lower: used
    dst = np.array([t.host_index["h000"]])
    healthy = b.map.estimate(4, dst, 1e9, now=NOW + 0.1).bandwidth_bytes_s[0]
    assert healthy == pytest.approx(nominal / 4 - 1e8)
    b.apply("h004", (nic("h004", tx=0.0, speed=nominal, up=False, ts=NOW + 0.2),),
            NOW + 0.2, own)
    assert not b.map.link_up[up]
    assert b.map.available(NOW + 0.2)[up] == 0.0  # no residual: never 'healthy' or 'idle'
    down = b.map.estimate(4, dst, 1e9, now=NOW + 0.2)
    assert down.bandwidth_bytes_s[0] <= 1.0 and down.seconds[0] > 1e8
    b.apply("h004", (nic("h004", tx=0.0, speed=nominal, ts=NOW + 0.3),), NOW + 0.3, own)
    assert b.map.link_up[up]  # back up: healthy again
