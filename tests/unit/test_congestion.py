"""The congestion map: freshness decay to the prior, path composition, tomography, snapshots."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from netkv.contracts.snapshot import (
    SnapshotError,
    decode_snapshot,
    encode_snapshot,
    snapshot_header,
)
from netkv.core.congestion import INFERRED_CONFIDENCE, CongestionMap, MapParams
from netkv.core.costmodel import CostOracle, static_tier_oracle
from netkv.core.tomography import localise_inflation
from netkv.core.topology import FloatArray, IntArray, Topology
from netkv.core.topology_file import parse_topology

pytestmark = pytest.mark.unit

NOW = 1_700_000_000.0
GB = 1e9


def topo() -> Topology:
    return parse_topology({"fabric": {"nic_gbps": 400, "pod_oversubscription": 4},
                           "fat_tree": {}})


def cmap(t: Topology) -> CongestionMap:
    return CongestionMap(t, MapParams(fresh_s=1.0, stale_s=3.0), clock=lambda: NOW)


def link(t: Topology, name: str) -> int:
    return t.link_index[name]


def test_empty_map_is_the_tier_prior_not_idle() -> None:
    t = topo()
    m = cmap(t)
    assert isinstance(m, CostOracle)
    dsts = np.arange(t.n_hosts)
    est = m.estimate(0, dsts, 4 * GB)
    prior = static_tier_oracle(t).estimate(0, dsts, 4 * GB)
    np.testing.assert_allclose(est.seconds, prior.seconds)
    assert np.all(est.confidence == 0)
    assert np.all(np.isinf(est.age_s))
    # The prior is worse than the idle fabric across the shared core.
    idle = t.capacity[list(t.path(0, 7))].min()
    assert est.bandwidth_bytes_s[7] < idle


def test_fresh_idle_counters_beat_the_prior_and_saturation_loses() -> None:
    t = topo()
    m = cmap(t)
    for h in range(t.n_hosts):
        for d in ("up", "down"):
            m.observe_link(link(t, f"h{h:03d}/nic/{d}"), 0.0, NOW)
    for name in ("leaf0.0", "leaf0.1", "leaf1.0", "leaf1.1", "pod0", "pod1"):
        for d in ("up", "down"):
            m.observe_link(link(t, f"{name}/{d}"), 0.0, NOW)
    idle = m.estimate(0, np.array([1, 7]), 4 * GB)
    prior = static_tier_oracle(t).estimate(0, np.array([1, 7]), 4 * GB)
    assert idle.seconds[1] < prior.seconds[1]
    assert np.all(idle.confidence == 1) and np.all(idle.age_s == 0)
    # Saturate h001's receive side: the pair (0, 1) slows down by the min-share floor.
    cap = t.capacity[link(t, "h001/nic/down")]
    m.observe_link(link(t, "h001/nic/down"), cap, NOW)
    busy = m.estimate(0, np.array([1, 7]), 4 * GB)
    assert busy.seconds[0] > 5 * idle.seconds[0]
    assert busy.seconds[1] == pytest.approx(idle.seconds[1])  # other paths untouched


def test_stale_links_decay_to_the_prior_within_stale_s() -> None:
    t = topo()
    m = cmap(t)
    up = link(t, "h000/nic/up")
    m.observe_link(up, 0.0, NOW)
    prior = t.nominal_share()
    assert m.available(NOW)[up] == pytest.approx(t.capacity[up])
    assert m.link_confidence(NOW + 2.0)[up] == pytest.approx(0.5)
    assert m.available(NOW + 3.0)[up] == pytest.approx(prior[up])
    assert m.link_confidence(NOW + 10)[up] == 0
    # A saturated but stale link also returns to the prior (never "healthy", never stuck).
    m.observe_link(up, t.capacity[up], NOW)
    assert m.available(NOW + 3.0)[up] == pytest.approx(prior[up])


def test_out_of_order_samples_do_not_overwrite_newer_ones() -> None:
    t = topo()
    m = cmap(t)
    up = link(t, "h000/nic/up")
    m.observe_link(up, 5.0, NOW)
    m.observe_link(up, 9.0, NOW - 1)
    assert m.util[up] == 5.0


def test_fresh_rtt_sets_latency_and_loss_lowers_bandwidth() -> None:
    t = topo()
    m = cmap(t)
    m.observe_rtt(0, 7, srtt_s=0.010, min_s=0.001, p99_s=0.02, loss=0.5, ts=NOW)
    est = m.estimate(7, np.array([0, 1]), 0.0)  # symmetric: (7, 0) uses the same pair
    assert est.latency_s[0] == pytest.approx(0.005)
    assert est.latency_s[1] == pytest.approx(t.path_latency(7, 1))
    full = m.estimate(0, np.array([7]), 1e6)
    assert full.bandwidth_bytes_s[0] == pytest.approx(
        static_tier_oracle(t).estimate(0, np.array([7]), 0).bandwidth_bytes_s[0] * 0.5)
    # Once stale the RTT no longer counts.
    stale = m.estimate(0, np.array([7]), 0.0, now=NOW + 5)
    assert stale.latency_s[0] == pytest.approx(t.path_latency(0, 7))


def test_min_rtt_is_kept_across_samples() -> None:
    t = topo()
    m = cmap(t)
    m.observe_rtt(0, 1, srtt_s=0.002, min_s=0.001, p99_s=0.003, loss=0.0, ts=NOW)
    m.observe_rtt(1, 0, srtt_s=0.009, min_s=0.008, p99_s=0.010, loss=0.0, ts=NOW + 0.1)
    assert m.pairs[(0, 1)].min_s == 0.001
    assert m.pairs[(0, 1)].srtt_s == 0.009


def test_host_liveness() -> None:
    t = topo()
    m = cmap(t)
    m.observe_host(3, NOW - 1)
    alive = m.hosts_alive(NOW)
    assert alive.tolist() == [False, False, False, True, False, False, False, False]
    assert not m.hosts_alive(NOW + 5)[3]


def test_tomography_localises_inflation_to_the_shared_uplink() -> None:
    t = topo()
    m = cmap(t)
    # Counters cover every NIC (idle) but no switch reports; leaf0.0/up is congested: every
    # pair leaving leaf0.0 is inflated, pairs inside the leaf and elsewhere are not.
    for h in range(t.n_hosts):
        for d in ("up", "down"):
            m.observe_link(link(t, f"h{h:03d}/nic/{d}"), 0.0, NOW)
    def rtt(a: int, b: int, srtt: float) -> None:
        m.observe_rtt(a, b, srtt_s=srtt, min_s=0.0001, p99_s=srtt, loss=0.0, ts=NOW)

    rtt(0, 1, 0.0001)  # same leaf: clean
    rtt(0, 2, 0.0051)  # leaves leaf0.0
    rtt(1, 5, 0.0061)  # leaves leaf0.0 across the core
    rtt(2, 3, 0.0001)  # leaf0.1: clean
    rtt(3, 6, 0.0001)  # leaf0.1 -> pod1: clean
    rtt(4, 6, 0.0001)  # clears leaf1.0 (h005's leaf)
    found = localise_inflation(m, NOW)
    hot = {t.links[i].name for i in np.nonzero(m.queue_s > 0)[0]}
    # RTT is symmetric, so the intersection cannot tell leaf0.0/up from leaf0.0/down.
    assert hot == {"leaf0.0/up", "leaf0.0/down"} and found == 2
    assert m.queue_s[link(t, "leaf0.0/up")] == pytest.approx(0.005)
    assert m.source_confidence[link(t, "leaf0.0/up")] == INFERRED_CONFIDENCE
    busy = m.estimate(0, np.array([2, 1]), 4 * GB)
    before = static_tier_oracle(t).estimate(0, np.array([2]), 4 * GB)
    assert busy.seconds[0] > before.seconds[0]
    assert busy.confidence[0] == INFERRED_CONFIDENCE


def test_snapshot_round_trip() -> None:
    t = topo()
    m = cmap(t)
    m.observe_link(link(t, "h000/nic/up"), 1e9, NOW, capacity_bytes_s=25e9, queue_s=0.001)
    m.observe_rtt(0, 7, srtt_s=0.004, min_s=0.001, p99_s=0.008, loss=0.01, ts=NOW)
    m.observe_rtt(0, 3, srtt_s=0.002, min_s=0.001, p99_s=0.003, loss=0.0, ts=NOW)
    m.observe_host(0, NOW)
    data = encode_snapshot(m, 42, created_ts=NOW)
    back = decode_snapshot(t, data, clock=lambda: NOW)
    assert back.version == 42 and back.created_ts == NOW
    assert snapshot_header(data).version == 42
    dsts = np.arange(t.n_hosts)
    a, b = m.estimate(0, dsts, 1e9), back.estimate(0, dsts, 1e9)
    np.testing.assert_allclose(a.seconds, b.seconds)
    np.testing.assert_allclose(a.confidence, b.confidence)
    assert back.pairs == m.pairs


def _tamper(data: bytes, path: tuple[str, ...], value: object) -> bytes:
    raw = msgpack.unpackb(data)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    out: bytes = msgpack.packb(raw)
    return out


@pytest.mark.parametrize(("path", "value", "where"), [
    (("schema",), 99, "schema"),
    (("version",), -1, "version"),
    (("created_ts",), float("nan"), "created_ts"),
    (("links", "util_bytes_s"), [1.0], "links.util_bytes_s"),
    (("links", "name"), ["nope"], "links.name[0]"),
    (("links", "extra"), [], "links.extra"),
    (("params", "stale_s"), 0.5, "params"),
    (("pairs", "loss"), [], "pairs.loss"),
])
def test_snapshot_decoding_is_strict(path: tuple[str, ...], value: object, where: str) -> None:
    t = topo()
    m = cmap(t)
    m.observe_rtt(0, 7, srtt_s=0.004, min_s=0.001, p99_s=0.008, loss=0.01, ts=NOW)
    data = _tamper(encode_snapshot(m, 1, NOW), path, value)
    with pytest.raises(SnapshotError) as info:
        decode_snapshot(t, data)
    assert info.value.where == where


def test_snapshot_rejects_garbage() -> None:
    t = topo()
    with pytest.raises(SnapshotError):
        decode_snapshot(t, b"\x92\x01")
    with pytest.raises(SnapshotError):
        decode_snapshot(t, encode_snapshot(cmap(t), 1)[:-3])


def test_negative_link_values_rejected() -> None:
    t = topo()
    data = _tamper(encode_snapshot(cmap(t), 1, NOW), ("links", "util_bytes_s"),
                   [-1.0] * t.n_links)
    with pytest.raises(SnapshotError, match="finite"):
        decode_snapshot(t, data)


def test_pairs_of_a_silent_agent_are_ignored() -> None:
    t = topo()
    m = cmap(t)
    m.observe_host(0, NOW - 10)  # h000's agent went silent long ago
    m.observe_host(7, NOW)
    m.observe_rtt(0, 7, srtt_s=0.010, min_s=0.001, p99_s=0.02, loss=1.0, ts=NOW)
    est = m.estimate(7, np.array([0]), 1e9)
    prior = static_tier_oracle(t).estimate(7, np.array([0]), 1e9)
    assert est.seconds[0] == pytest.approx(prior.seconds[0])



def _reference(m: CongestionMap, src: int, dsts: IntArray, nbytes: FloatArray,
               now: float) -> list[tuple[float, float, float, float, float, int]]:
    """The module docstring's formulas, one destination at a time along ``Topology.path``."""
    t, p = m.topology, m.params
    age = m.link_age(now)
    conf = m.link_confidence(now)
    avail = m.available(now)
    lat = t.latency + conf * m.queue_s
    silent = [m.host_seen_ts[h] > 0 and now - m.host_seen_ts[h] > p.stale_s
              for h in range(t.n_hosts)]
    out = []
    for dst, size in zip(dsts.tolist(), nbytes.tolist(), strict=True):
        path = list(t.path(src, dst))
        latency = float(sum(lat[path]))
        bandwidth = max(float(min(avail[path])), 1.0)
        loss = 0.0
        pair = m.pairs.get((min(src, dst), max(src, dst)))
        if pair is not None and dst != src and not silent[src] and not silent[dst]:
            span = p.stale_s - p.fresh_s
            w = min(max((p.stale_s - (now - pair.ts)) / span, 0.0), 1.0)
            latency = w * pair.srtt_s / 2 + (1 - w) * latency
            loss = w * min(pair.loss, p.max_loss)
        bandwidth *= 1 - loss
        out.append((latency + size / bandwidth, latency, bandwidth, float(max(age[path])),
                    float(min(conf[path])), int(t.tier(src, dst))))
    return out


def test_estimate_and_its_cached_view_match_a_per_destination_reference() -> None:
    t = topo()
    m = cmap(t)
    rng = np.random.default_rng(3)
    for i, lk in enumerate(t.links):
        m.observe_link(i, float(rng.uniform(0, 0.9)) * lk.capacity_bytes_s,
                       NOW - float(rng.uniform(0, 4)), queue_s=float(rng.uniform(0, 1e-3)))
    for h in range(t.n_hosts):
        m.observe_host(h, NOW if h != 6 else NOW - 10)  # h006's agent went silent
    for a, b, age in ((0, 1, 0.5), (0, 5, 1.5), (2, 7, 2.5), (3, 3, 0.0), (4, 6, 0.0),
                      (1, 2, 4.0), (7, 0, 0.2)):
        m.observe_rtt(a, b, srtt_s=2e-4 * (a + 1), min_s=1e-4, p99_s=5e-4, loss=0.02 * b,
                      ts=NOW - age)
    dsts = np.array([*range(t.n_hosts), 5, 0, 0], dtype=np.int64)  # repeats are allowed
    nbytes = np.asarray(rng.uniform(1e6, 4e9, dsts.shape[0]), dtype=np.float64)
    view = m.cached(ttl_s=10.0, clock=lambda: NOW)
    for src in range(t.n_hosts):
        want: FloatArray = np.array(_reference(m, src, dsts, nbytes, NOW), dtype=np.float64)
        for got in (m.estimate(src, dsts, nbytes, now=NOW), view.estimate(src, dsts, nbytes)):
            np.testing.assert_allclose(got.seconds, want[:, 0], rtol=1e-12)
            np.testing.assert_allclose(got.latency_s, want[:, 1], rtol=1e-12)
            np.testing.assert_allclose(got.bandwidth_bytes_s, want[:, 2], rtol=1e-12)
            np.testing.assert_array_equal(got.age_s, want[:, 3])
            np.testing.assert_array_equal(got.confidence, want[:, 4])
            assert got.tier.tolist() == want[:, 5].astype(int).tolist()


def test_cached_view_rereads_the_map_after_ttl_or_a_change() -> None:
    t = topo()
    m = cmap(t)
    clock = [NOW]
    view = m.cached(ttl_s=1.0, clock=lambda: clock[0])
    dst = np.array([7])
    before = view.estimate(0, dst, GB).seconds[0]
    m.observe_rtt(0, 7, srtt_s=0.010, min_s=0.001, p99_s=0.02, loss=0.5, ts=NOW)
    changed = view.estimate(0, dst, GB).seconds[0]
    assert changed > before
    assert changed == pytest.approx(m.estimate(0, dst, GB).seconds[0], rel=1e-12)
    clock[0] += 2.5  # the pair ages (fresh_s=1, stale_s=3): the view is re-read after ttl
    assert view.estimate(0, dst, GB).seconds[0] == pytest.approx(
        m.estimate(0, dst, GB, now=clock[0]).seconds[0], rel=1e-12)


_json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)


def _good_snapshot() -> bytes:
    good = cmap(topo())
    good.observe_rtt(0, 7, srtt_s=0.004, min_s=0.001, p99_s=0.008, loss=0.01, ts=NOW)
    return encode_snapshot(good, 1, NOW)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=256))
@example(data=_good_snapshot())  # the accepted branch, every run
@example(data=b"\x81\xa1 \x01")  # {" ": 1}: an unknown top-level key, named by the error
def test_snapshot_decoding_never_raises_anything_else_on_bytes(data: bytes) -> None:
    t = topo()
    try:
        decoded = decode_snapshot(t, data)
    except SnapshotError as exc:  # rejected: the error names the (top-level) field, if any
        _assert_names_a_field(exc, "")
    else:  # accepted: what was read is what is written back
        _assert_round_trips(t, decoded)


_SECTIONS = ("links", "hosts", "pairs", "params", "version", "created_ts", "schema", "epoch",
             "agents")


def _assert_names_a_field(exc: SnapshotError, section: str) -> None:
    """A rejection is a bad_snapshot naming the tampered section (or the root, for bytes
    that are not a snapshot at all) and says so in its message."""
    assert exc.reason == "bad_snapshot"
    assert str(exc).startswith(f"snapshot.{exc.where}: ") and str(exc) != f"snapshot.{exc.where}: "
    head = exc.where.split(".")[0].split("[")[0]
    if section:
        assert head == section, (exc.where, section)
    elif "unknown field" in str(exc):  # an extra top-level key: the error names that key
        assert f"`{exc.where}`" in str(exc), exc.where
    else:
        assert head in ("", *_SECTIONS), exc.where


def _assert_round_trips(t: Topology, decoded: CongestionMap) -> None:
    again = decode_snapshot(t, encode_snapshot(decoded, decoded.version, decoded.created_ts))
    assert (again.version, again.created_ts, again.epoch) == \
        (decoded.version, decoded.created_ts, decoded.epoch)
    for name in ("util", "capacity", "queue_s", "updated_ts", "source_confidence", "link_up",
                 "host_seen_ts"):
        np.testing.assert_array_equal(getattr(again, name), getattr(decoded, name))
    assert again.pairs == decoded.pairs


@settings(max_examples=200, deadline=None)
@given(section=st.sampled_from(["links", "hosts", "pairs", "params", "version",
                                "created_ts", "schema"]),
       value=_json_like)
@example(section="version", value=7)  # accepted tamperings, every run
@example(section="created_ts", value=NOW + 1)
def test_snapshot_decoding_never_raises_anything_else_on_structure(section: str,
                                                                   value: object) -> None:
    t = topo()
    good = cmap(t)
    good.observe_rtt(0, 7, srtt_s=0.004, min_s=0.001, p99_s=0.008, loss=0.01, ts=NOW)
    data = _tamper(encode_snapshot(good, 1, NOW), (section,), value)
    try:
        decoded = decode_snapshot(t, data)
    except SnapshotError as exc:
        _assert_names_a_field(exc, section)
    else:  # accepted: the tampered value is what was read, and the rest is intact
        if section in ("version", "created_ts"):
            assert getattr(decoded, section) == value
        assert decoded.pairs == decode_snapshot(t, encode_snapshot(good, 1, NOW)).pairs
        _assert_round_trips(t, decoded)
