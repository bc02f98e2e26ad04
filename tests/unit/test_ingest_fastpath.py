"""The ingest hot path computes what the straightforward code did.

Each fast path is checked against a reference kept here verbatim from before the rewrite
(the per-sample RTT rows fed to ``observe_rtts``, the list-and-sum link refresh, one metric
update per entry), on random inputs, bit for bit; and a round of entries through
``_handle_all`` rejects, counts and applies exactly what one ``handle`` per entry does.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any, cast

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netkv_oracle.builder import MapBuilder
from netkv_oracle.identity import Ownership
from netkv_oracle.ingest import Ingestor
from netkv_oracle.metrics import OracleMetrics

from netkv.contracts.names import RedisKeys
from netkv.contracts.samples import NicSample, RdmaSample, RttSample, Sample
from netkv.contracts.wire import Batch, decode_batch, encode_batch
from netkv.core.congestion import CongestionMap, MapParams, PairState
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology

pytestmark = pytest.mark.unit

NOW = 1_700_000_000.0
TOPO = parse_topology({"fabric": {"nic_gbps": 8}, "fat_tree": {}})  # 8 hosts
HOSTS = [h.name for h in TOPO.hosts]


# -- references (the code before the fast paths) --------------------------------------------
def reference_rtt_rows(cmap: CongestionMap, host: int, rtts: list[RttSample], now: float
                       ) -> Iterator[tuple[int, float, float, float, float, float]]:
    index, pairs = cmap.topology.host_index, cmap.pairs
    for s in rtts:
        sent, lost = s.sent, s.lost
        if sent <= 0:
            continue
        peer = index[s.peer]
        ts = s.ts if s.ts < now else now
        if sent > lost:
            yield peer, s.srtt_s, s.min_s, s.p99_s, lost / sent, ts
            continue
        old = pairs.get((host, peer) if host <= peer else (peer, host))
        if old is not None:
            yield peer, old.srtt_s, old.min_s, old.p99_s, 1.0, ts


def reference_refresh(builder: MapBuilder, link: int, now: float) -> None:
    horizon = now - builder.map.params.stale_s
    fresh = [(k, v) for k, v in builder._sources.get(link, {}).items() if v[2] >= horizon]
    if not fresh:
        return
    net = sum(v[0] for k, v in fresh if k[0] == "net")
    rdma = sum(v[0] for k, v in fresh if k[0] == "rdma")
    ts = max(v[2] for _, v in fresh)
    netdevs = [v for k, v in fresh if k[0] == "net"]
    speed = sum(v[1] for v in netdevs)
    capacity = min(speed, float(builder.topology.capacity[link])) if speed > 0 else None
    up = any(v[3] for v in netdevs) if netdevs else None
    builder.map.observe_link(link, max(net, rdma), ts, capacity_bytes_s=capacity, up=up)


# -- strategies -----------------------------------------------------------------------------
times = st.sampled_from([NOW - 200.0, NOW - 5.0, NOW - 1.0, NOW, NOW + 3.0])
seconds = st.sampled_from([0.0, 1e-4, 2e-4, 5e-4, 0.002, 0.01])


@st.composite
def rtt_windows(draw: st.DrawFn, reporter: str) -> RttSample:
    sent = draw(st.integers(0, 4))
    return RttSample(reporter=reporter, peer=draw(st.sampled_from(HOSTS)), ts=draw(times),
                     window_s=0.1, sent=sent, lost=draw(st.integers(0, sent)),
                     srtt_s=draw(seconds), p50_s=draw(seconds), p99_s=draw(seconds),
                     min_s=draw(seconds))


def pairs_of(cmap: CongestionMap) -> dict[tuple[int, int], tuple[float, ...]]:
    return {k: (p.srtt_s, p.min_s, p.p99_s, p.loss, p.ts) for k, p in cmap.pairs.items()}


def peers_of(cmap: CongestionMap) -> dict[int, dict[int, tuple[float, ...]]]:
    return {a: {b: (p.srtt_s, p.min_s, p.p99_s, p.loss, p.ts) for b, p in row.items()}
            for a, row in cmap._peers.items()}


@settings(max_examples=300, deadline=None)
@given(host=st.integers(0, 7), data=st.data(),
       seeded=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7), seconds, seconds,
                                 times), max_size=6))
def test_rtt_windows_match_the_per_sample_rows(host: int, data: st.DataObject,
                                               seeded: list[tuple[Any, ...]]) -> None:
    """Duplicated peers, empty and fully lost windows, old and future timestamps, pairs
    known before or not: the same pairs, peers index and generation."""
    rounds = data.draw(st.lists(st.lists(rtt_windows(HOSTS[host]), max_size=8), max_size=3))
    fast, slow = CongestionMap(TOPO), CongestionMap(TOPO)
    for cmap in (fast, slow):
        for a, b, srtt, floor, ts in seeded:
            cmap.set_pair(a, b, PairState(srtt, floor, srtt, 0.0, ts))
    for windows in rounds:
        fast.observe_rtt_windows(host, windows, NOW)
        slow.observe_rtts(host, reference_rtt_rows(slow, host, windows, NOW))
    assert pairs_of(fast) == pairs_of(slow)
    assert peers_of(fast) == peers_of(slow)
    assert fast.generation == slow.generation
    # Entries of both indexes are the same objects (an update in place reaches both).
    assert all(fast._peers[a][b] is p for (a, b), p in fast.pairs.items() if a != b)


sources = st.lists(st.tuples(
    st.sampled_from(["net", "rdma"]), st.sampled_from(["eth0", "eth1", "mlx5_0/1"]),
    st.sampled_from([0.0, -0.0, 1.0, 3e8, 1.25e9]), st.sampled_from([0.0, 5e8, 2e9]),
    times, st.booleans()), max_size=5)


@settings(max_examples=300, deadline=None)
@given(per_link=st.lists(sources, min_size=1, max_size=3),
       stale=st.sampled_from([3.0, 150.0]))
def test_link_refresh_matches_the_list_and_sum_reference(
        per_link: list[list[tuple[Any, ...]]], stale: float) -> None:
    params = MapParams(fresh_s=1.0, stale_s=stale)
    fast, slow = MapBuilder(TOPO, params), MapBuilder(TOPO, params)
    for link, table in enumerate(per_link):
        for b in (fast, slow):
            b._sources[link] = {(kind, name): (rate, cap, ts, up)
                                for kind, name, rate, cap, ts, up in table}
        fast._refresh(link, NOW)
        reference_refresh(slow, link, NOW)
    for name in ("util", "capacity", "link_up", "updated_ts", "source_confidence"):
        a, b = getattr(fast.map, name), getattr(slow.map, name)
        assert a.tobytes() == b.tobytes(), name  # bit for bit, signed zeros included
    assert fast.map.generation == slow.map.generation


# -- a round of entries against one handle() per entry ---------------------------------------
def nic(reporter: str, tx: float, ts: float = NOW, name: str = "eth0") -> NicSample:
    return NicSample(reporter=reporter, nic=name, ts=ts, window_s=0.1, tx_bytes_s=tx,
                     rx_bytes_s=tx / 2, tx_packets_s=1.0, rx_packets_s=1.0, drops_s=0.0,
                     errors_s=0.0, capacity_bps=0.0, oper_up=True)


def rtt(reporter: str, peer: str, sent: int = 3, lost: int = 0) -> RttSample:
    return RttSample(reporter=reporter, peer=peer, ts=NOW, window_s=0.1, sent=sent, lost=lost,
                     srtt_s=1e-4, p50_s=1e-4, p99_s=2e-4, min_s=9e-5)


def rdma(reporter: str, tx: float) -> RdmaSample:
    return RdmaSample(reporter=reporter, device="mlx5_0", port=1, ts=NOW, window_s=0.1,
                      tx_bytes_s=tx, rx_bytes_s=tx, cnp_sent_s=0.0, cnp_handled_s=0.0,
                      ecn_marked_s=0.0, xmit_wait_s=0.0)


def enc(agent: str, *samples: Sample) -> bytes:
    return encode_batch(Batch(agent, 1, NOW, samples))


ENTRIES: list[Any] = [  # (agent whose stream it is on, fields); good and hostile mixed
    ("h001", {b"b": enc("h001", nic("h001", 1e8), rtt("h001", "h002"), rtt("h001", "h003"))}),
    ("h001", {b"b": enc("h001", nic("h002", 1e8))}),  # wrong_reporter
    ("h001", {b"b": enc("h001", rdma("h001", 5e8), rtt("h001", "h002", 4, 4))}),
    ("h001", {b"b": enc("h002", nic("h002", 1.0))}),  # wrong_agent
    ("h001", {b"b": b"\x93garbage"}),  # undecodable
    ("h001", {b"a": b"1", b"b": b"2"}),  # bad_entry
    ("h001", {b"b": "text"}),  # bad_entry
    ("h001", None),  # deleted while pending
    ("h002", {b"b": enc("h002", rtt("h002", "h999"))}),  # unknown_peer
    ("h002", {b"b": enc("h002", nic("h002", 2e8, ts=NOW + 50), rtt("h002", "h001"))}),
    ("h002", {b"b": msgpack.packb({"v": 99, "agent": "h002", "seq": 1, "ts": 1.0,
                                    "samples": []})}),  # bad_version
    ("h003", {b"b": enc("h003", nic("h003", float(7)), nic("h003", 1.0, name="h004/nic/up"))}),
]


def counters(metrics: OracleMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in metrics.registry.collect() for s in f.samples
            if s.name.endswith("_total")}


def ingestor(topology: Topology) -> Ingestor:
    b = MapBuilder(topology, MapParams(fresh_s=60, stale_s=120), clock=lambda: NOW)
    return Ingestor(cast(Any, None), RedisKeys(), "c", b, ownership=Ownership(topology),
                    metrics=OracleMetrics(), clock=lambda: NOW)


@pytest.mark.parametrize("order", ["as_written", "reversed"])
def test_a_round_of_entries_equals_one_handle_per_entry(order: str) -> None:
    entries = ENTRIES if order == "as_written" else ENTRIES[::-1]
    keys = RedisKeys()
    one, per_entry = ingestor(TOPO), ingestor(TOPO)
    by_stream: dict[str, list[Any]] = {}
    for i, (agent, fields) in enumerate(entries):
        stream = keys.samples_stream(agent)
        by_stream.setdefault(stream, []).append((f"{i}-0".encode(), fields))
        if fields is not None:
            per_entry.handle(stream, fields, NOW)
    for stream, items in by_stream.items():
        assert one._handle_all(stream, items) == [entry_id for entry_id, _ in items]
    assert counters(one.metrics) == counters(per_entry.metrics)
    rejected = {k[1]: v for k, v in counters(one.metrics).items()
                if k[0] == "netkv_samples_rejected_total"}
    assert sum(rejected.values()) == 8 and rejected[(("reason", "bad_entry"),)] == 2
    for name in ("util", "capacity", "updated_ts", "host_seen_ts"):
        assert np.array_equal(getattr(one.builder.map, name),
                              getattr(per_entry.builder.map, name)), name
    assert pairs_of(one.builder.map) == pairs_of(per_entry.builder.map)
    # Rejected entries are queued for XDEL, ids in stream order.
    assert sum(map(len, one._rejected.values())) == 8


def test_a_stream_that_is_not_a_sample_stream_is_rejected_every_time() -> None:
    ing = ingestor(TOPO)
    for _ in range(2):  # the second time from the owner cache
        assert not ing.handle("elsewhere:samples:h001", {b"b": enc("h001")}, NOW)
    assert counters(ing.metrics)[("netkv_samples_rejected_total",
                                  (("reason", "bad_stream"),))] == 2


def test_decoded_samples_are_not_tracked_by_the_cyclic_gc() -> None:
    """Samples hold only numbers and strings (gc=False is safe); untracked, a busy ingest
    does not drive the collector over the oracle's heap."""
    decoded = decode_batch(enc("h001", nic("h001", 1.0), rtt("h001", "h002"), rdma("h001", 1)))
    assert not any(gc.is_tracked(s) for s in decoded.samples)
    assert not gc.is_tracked(decoded)
    for s in decoded.samples:
        assert all(isinstance(getattr(s, f), str | int | float | bool)
                   for f in s.__struct_fields__)
