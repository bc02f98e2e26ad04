"""Each decode policy on small hand-worked cases over an 8-host, four-tier fat-tree."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from netkv.core.costmodel import LinkStateOracle
from netkv.core.policies import (
    Bookings,
    CandidateView,
    DecisionEngine,
    PrefillView,
    RequestView,
    make_policy,
    policy_names,
)
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError

pytestmark = pytest.mark.unit

BPT = 327680.0  # LLaMA3-70B bytes per token
NIC = 400e9 / 8


@pytest.fixture(scope="module")
def topo() -> Topology:
    # 2 pods x 2 leaves x 2 hosts; hosts 0-3 in pod0 (leaf0.0: 0,1; leaf0.1: 2,3), 4-7 in pod1.
    return parse_topology({"fabric": {"nic_gbps": 400, "pod_oversubscription": 1},
                           "fat_tree": {}})


def idle_oracle(topo: Topology, congested: dict[str, float] | None = None) -> LinkStateOracle:
    avail = topo.capacity.copy()
    for name, fraction in (congested or {}).items():
        avail[topo.link_index[name]] *= fraction
    return LinkStateOracle(topo, avail, topo.latency.copy())


def view(hosts: list[int], **kw: Any) -> CandidateView:
    n = len(hosts)
    return CandidateView(
        host=np.array(hosts, dtype=np.int64),
        running=np.array(kw.get("running", [0] * n), dtype=np.int64),
        waiting=np.array(kw.get("waiting", [0] * n), dtype=np.int64),
        kv_use=np.array(kw.get("kv_use", [0.0] * n), dtype=np.float64),
        capacity_tokens=np.array(kw.get("capacity", [400_000.0] * n), dtype=np.float64),
        tbt_s=np.array(kw["tbt"], dtype=np.float64) if "tbt" in kw else None,
    )


def request(tokens: int = 10_000, overlap: list[int] | None = None, **kw: Any) -> RequestView:
    return RequestView(
        prefill_host=kw.pop("src", 0), prompt_tokens=tokens, kv_bytes_per_token=BPT,
        overlap_blocks=None if overlap is None else np.array(overlap, dtype=np.int64), **kw)


def test_registry_names_and_errors() -> None:
    assert set(policy_names()) == {"round_robin", "least_loaded", "cache_load",
                                   "llmd_weighted", "netkv", "netkv_pair", "power_of_two",
                                   "cache_aware", "dynamo_disagg", "llmd_prefill_first"}
    with pytest.raises(InputError, match="unknown policy 'fastest'"):
        make_policy("fastest")
    with pytest.raises(InputError, match=r"policies\.cache_load\.weight"):
        make_policy("cache_load", {"weight": 2})
    with pytest.raises(InputError, match=r"policies\.cache_load\.prefill_load_scale"):
        make_policy("cache_load", {"prefill_load_scale": -1})
    with pytest.raises(InputError, match=r"policies\.least_loaded\.metric"):
        make_policy("least_loaded", {"metric": "vibes"})
    assert make_policy("cache_load", {"prefill_load_scale": 0.5}).name == "cache_load"


def test_congested_core_link_netkv_avoids_it_cache_load_does_not_care(topo: Topology) -> None:
    # Two idle decoders across the core on hosts 4 and 6; leaf1.0/down (towards host 4)
    # carries background traffic leaving 5% of its capacity.
    oracle = idle_oracle(topo, {"leaf1.0/down": 0.05})
    cands = view([4, 6])
    req = request(10_000)
    netkv = make_policy("netkv").decide(req, cands, oracle)
    assert netkv.index == 1 and netkv.tier == 3
    nbytes = 10_000 * BPT
    assert netkv.transfer_bytes == pytest.approx(nbytes)
    assert netkv.transfer_s == pytest.approx(topo.path_latency(0, 6) + nbytes / NIC)
    assert netkv.scores is not None and netkv.scores[0] > netkv.scores[1] * 5
    cache = make_policy("cache_load").decide(req, cands, oracle)
    assert cache.scores is not None and cache.scores[0] == cache.scores[1]
    # ...so over many requests it sends half of them through the congested link.
    picks = [make_policy("cache_load", {"seed": s}).decide(req, cands, oracle).index
             for s in range(40)]
    assert 0 < sum(picks) < 40


def test_netkv_prefers_the_near_tier_when_idle(topo: Topology) -> None:
    d = make_policy("netkv").decide(request(), view([7, 2, 1]), idle_oracle(topo))
    assert d.index == 2 and d.tier == 1  # host 1 shares host 0's leaf
    assert d.ttft_s == pytest.approx(d.queue_s + d.transfer_s + d.first_token_s)


def test_bookings_spread_a_burst(topo: Topology) -> None:
    # Decoders on hosts 4 and 6 (across the core from host 0). A transfer booked from
    # prefill host 5 into host 4 (same leaf) fills h004's NIC; the next request, priced before
    # telemetry could show that flow, goes to host 6.
    oracle = idle_oracle(topo)
    engine = DecisionEngine.from_name("netkv", None, topo)
    cands = view([4, 6])
    booking = engine.reserve(5, 4, 10_000 * BPT)
    d = engine.decide(request(10_000), cands, oracle)
    assert d.index == 1
    assert d.scores is not None
    assert d.scores[0] - d.scores[1] == pytest.approx(10_000 * BPT / NIC, rel=1e-3)
    engine.release(booking)
    assert not engine.bookings.bytes.any() and not engine.bookings.flows.any()
    assert engine.decide(request(10_000), cands, oracle).scores is not None
    # The blind ablation sees two equal costs despite the booking.
    engine.reserve(5, 4, 10_000 * BPT)
    blind = make_policy("netkv", {"use_bookings": False}).decide(
        request(10_000), cands, oracle, engine.bookings)
    assert blind.scores is not None and blind.scores[0] == blind.scores[1]


def test_a_booking_covers_exactly_the_topology_path(topo: Topology) -> None:
    bookings = Bookings(topo)
    for src in range(topo.n_hosts):
        for dst in range(topo.n_hosts):
            booking = bookings.reserve(src, dst, 1e6)
            assert booking.links == topo.path(src, dst)
            bookings.release(booking)
    assert bookings.active == 0 and not bookings.bytes.any() and not bookings.flows.any()


def test_engines_share_a_ledger_given_at_construction(topo: Topology) -> None:
    ledger = Bookings(topo)
    a = DecisionEngine.from_name("netkv", None, topo, bookings=ledger)
    b = DecisionEngine(make_policy("least_loaded"), topo, bookings=ledger)
    booking = a.reserve(5, 4, 1e9)
    assert b.bookings is ledger and ledger.active == 1
    assert ledger.bytes[list(topo.path(5, 4))].tolist() == [1e9] * len(topo.path(5, 4))
    b.release(booking)
    assert ledger.active == 0 and not ledger.bytes.any()
    assert DecisionEngine(make_policy("netkv"), topo).bookings is not ledger
    other = parse_topology({"fat_tree": {"pods": 1}})
    with pytest.raises(ValueError, match="another topology"):
        DecisionEngine(make_policy("netkv"), other, bookings=ledger)


def test_same_source_bookings_share_the_source_nic(topo: Topology) -> None:
    oracle = idle_oracle(topo)
    engine = DecisionEngine.from_name("netkv", None, topo)
    cands = view([4, 6])
    first = engine.decide(request(), cands, oracle)
    engine.reserve(0, int(cands.host[first.index]), first.transfer_bytes)
    second = engine.decide(request(), cands, oracle)
    # Whichever decoder: the new flow shares host 0's NIC with the booked one.
    assert second.transfer_s == pytest.approx(2 * first.transfer_s, rel=1e-3)


def test_booked_bytes_inflate_only_paths_through_their_links(topo: Topology) -> None:
    oracle = idle_oracle(topo)
    engine = DecisionEngine.from_name("netkv", None, topo)
    engine.reserve(2, 4, 5_000 * BPT)  # pod0/up, pod1/down, leaf1.0/down, h004/nic/down
    d = engine.decide(request(10_000), view([5, 1]), oracle)
    assert d.scores is not None
    # h005 shares leaf1.0/down (2 NICs wide) with the booking: 5000 tokens at 2x NIC rate.
    base5 = topo.path_latency(0, 5) + 10_000 * BPT / NIC
    assert d.transfer_s == pytest.approx(topo.path_latency(0, 1) + 10_000 * BPT / NIC)
    assert d.scores[0] - 0.03 == pytest.approx(base5 + 5_000 * BPT / (2 * NIC))


def test_delta_transfer_moves_only_missing_blocks(topo: Topology) -> None:
    oracle = idle_oracle(topo)
    req = request(10_000, overlap=[0, 16])  # candidate 1 holds 16 blocks = 8192 tokens
    d = make_policy("netkv").decide(req, view([4, 6]), oracle)
    assert d.index == 1
    assert d.transfer_bytes == pytest.approx((10_000 - 16 * 512) * BPT)
    whole = request(1000, overlap=[5])  # overlap beyond the prompt cannot go negative
    d2 = make_policy("netkv").decide(whole, view([4]), oracle)
    assert d2.transfer_bytes == 0.0


def test_memory_queue_is_predicted_and_avoided(topo: Topology) -> None:
    # Decoder on the same leaf is full; the one across the core has room.
    cands = view([1, 5], kv_use=[0.99, 0.1], capacity=[100_000, 100_000])
    d = make_policy("netkv").decide(request(10_000), cands, idle_oracle(topo))
    assert d.index == 1 and d.queue_s == 0.0
    assert d.scores is not None
    # The full decoder must drain 10000 + 99000 - 100000 tokens at 99000 / 10 s.
    assert d.scores[0] > 9_000 / (99_000 / 10.0)


def test_cache_load_cost_hand_worked(topo: Topology) -> None:
    # 2048 tokens = 4 blocks; candidate 1 holds 3 of them but has 512 tokens (1 block) active.
    cands = view([1, 2], kv_use=[0.0, 0.5], capacity=[1024, 1024])
    req = request(2048, overlap=[0, 3])
    d = make_policy("cache_load", {"prefill_load_scale": 1.0}).decide(req, cands,
                                                                      idle_oracle(topo))
    assert d.scores is not None and d.scores.tolist() == [4.0, 2.0] and d.index == 1
    d0 = make_policy("cache_load", {"prefill_load_scale": 0.0}).decide(req, cands,
                                                                       idle_oracle(topo))
    assert d0.scores is not None and d0.scores.tolist() == [0.0, 1.0] and d0.index == 0


def test_llmd_weighted_scores_hand_worked(topo: Topology) -> None:
    # Candidates on host 0 (tier 0), host 1 (tier 1), host 4 (tier 3).
    cands = view([0, 1, 4], waiting=[4, 0, 2], kv_use=[0.5, 0.0, 0.25])
    req = request(2048, overlap=[0, 0, 4])
    d = make_policy("llmd_weighted").decide(req, cands, idle_oracle(topo))
    expected = np.array([
        2 * 0.0 + 2 * 0.5 + 3 * 0.0 + 1.0,
        2 * 1.0 + 2 * 1.0 + 3 * 0.0 + 0.2,
        2 * 0.5 + 2 * 0.75 + 3 * 1.0 + 0.02,
    ])
    assert d.scores is not None
    np.testing.assert_allclose(-d.scores, expected)
    assert d.index == 2


def test_round_robin_and_least_loaded(topo: Topology) -> None:
    rr = make_policy("round_robin")
    cands = view([1, 2, 3])
    assert [rr.decide(request(), cands, idle_oracle(topo)).index for _ in range(5)] == \
        [0, 1, 2, 0, 1]
    ll = make_policy("least_loaded")
    loaded = view([1, 2, 3], running=[3, 1, 2], waiting=[0, 0, 1])
    assert ll.decide(request(), loaded, idle_oracle(topo)).index == 1
    by_kv = make_policy("least_loaded", {"metric": "kv"})
    assert by_kv.decide(request(), view([1, 2], kv_use=[0.3, 0.2]),
                        idle_oracle(topo)).index == 1


def test_netkv_pair_trades_prefill_wait_against_transfer(topo: Topology) -> None:
    # Prefill on host 0 is ready in 1 s, on host 6 in 0.1 s. Decoders on hosts 1 and 7.
    # The core link out of pod0 is nearly dead, so host 0 -> host 7 is slow, but the pair
    # (host 6 -> host 7, same leaf) beats both host-0 options.
    oracle = idle_oracle(topo, {"pod0/up": 0.01})
    prefill = PrefillView(host=np.array([0, 6], dtype=np.int64),
                          ready_s=np.array([1.0, 0.1]))
    req = request(10_000, prefill=prefill)
    d = make_policy("netkv_pair").decide(req, view([1, 7]), oracle)
    assert d.prefill_index == 1 and d.index == 1 and d.tier == 1
    assert d.prefill_s == pytest.approx(0.1)
    # If host 6's prefill is slow, the pair is host 0 with its same-leaf decoder.
    slow = PrefillView(host=np.array([0, 6], dtype=np.int64), ready_s=np.array([0.1, 5.0]))
    d2 = make_policy("netkv_pair").decide(request(10_000, prefill=slow), view([1, 7]), oracle)
    assert d2.prefill_index == 0 and d2.index == 0
    # Without prefill candidates it is plain netkv.
    d3 = make_policy("netkv_pair").decide(request(10_000), view([1, 7]), oracle)
    assert d3.prefill_index is None and d3.index == 0


def test_engine_times_every_decision(topo: Topology) -> None:
    engine = DecisionEngine.from_name("llmd_weighted", None, topo)
    for _ in range(5):
        engine.decide(request(), view([1, 2, 3]), idle_oracle(topo))
    assert engine.count == 5 and engine.recorded().shape == (5,)
    pct = engine.percentiles_us()
    assert 0 < pct[50.0] <= pct[99.0]


def test_views_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="running"):
        CandidateView(host=np.arange(3), running=np.zeros(2, dtype=np.int64),
                      waiting=np.zeros(3, dtype=np.int64), kv_use=np.zeros(3),
                      capacity_tokens=np.ones(3))


class _Opaque:
    """Any CostOracle that is not a LinkStateOracle takes the protocol path."""

    def __init__(self, inner: LinkStateOracle) -> None:
        self.inner = inner
        self.available_bytes_s = inner.available_bytes_s  # per-link rates for bookings

    def estimate(self, src: int, dsts: Any, nbytes: Any) -> Any:
        return self.inner.estimate(src, dsts, nbytes)


def test_inline_link_state_path_matches_the_oracle_protocol(topo: Topology) -> None:
    oracle = idle_oracle(topo, {"pod0/up": 0.1, "leaf1.1/down": 0.3, "h003/nic/down": 0.5})
    engine = DecisionEngine.from_name("netkv", None, topo)
    engine.reserve(2, 6, 3e9)
    engine.reserve(1, 3, 1e9)
    hosts = list(range(8))
    cands = view(hosts, kv_use=[0.1 * i for i in range(8)], capacity=[50_000] * 8)
    req = request(12_345, overlap=[0, 1, 2, 3, 4, 5, 6, 7], src=0)
    fast = engine.policy.decide(req, cands, oracle, engine.bookings)
    slow = engine.policy.decide(req, cands, _Opaque(oracle), engine.bookings)
    assert fast.scores is not None and slow.scores is not None
    np.testing.assert_allclose(fast.scores, slow.scores, rtol=1e-12)
    llmd_fast = make_policy("llmd_weighted").decide(req, cands, oracle)
    llmd_slow = make_policy("llmd_weighted").decide(req, cands, _Opaque(oracle))
    assert llmd_fast.scores is not None and llmd_slow.scores is not None
    np.testing.assert_allclose(llmd_fast.scores, llmd_slow.scores)


def test_pair_vectorised_over_prefill_hosts_matches_the_protocol_path(topo: Topology) -> None:
    oracle = idle_oracle(topo, {"pod0/up": 0.05, "leaf1.0/down": 0.2})
    engine = DecisionEngine.from_name("netkv_pair", None, topo)
    engine.reserve(6, 7, 2e9)
    prefill = PrefillView(host=np.array([0, 3, 3, 6], dtype=np.int64),
                          ready_s=np.array([0.4, 0.2, 0.9, 0.3]))
    req = request(20_000, overlap=[0, 4, 0, 0, 30], prefill=prefill)
    cands = view([1, 2, 4, 5, 7])
    fast = engine.policy.decide(req, cands, oracle, engine.bookings)
    slow = engine.policy.decide(req, cands, _Opaque(oracle), engine.bookings)
    assert (fast.index, fast.prefill_index, fast.tier) == (slow.index, slow.prefill_index,
                                                           slow.tier)
    assert fast.ttft_s == pytest.approx(slow.ttft_s, rel=1e-12)
    # Brute force over every (prefill, decode) pair with the single-source predictor.
    best = min(
        (prefill.ready_s[p] + make_policy("netkv").decide(
            request(20_000, overlap=[0, 4, 0, 0, 30], src=int(prefill.host[p])),
            cands, oracle, engine.bookings).scores[d], p, d)  # type: ignore[index]
        for p in range(4) for d in range(5))
    assert (fast.prefill_index, fast.index) == (best[1], best[2])
