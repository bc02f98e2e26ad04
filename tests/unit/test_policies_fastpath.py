"""The per-view cached routes of ``predict`` give the general path's numbers bit for bit.

``predict`` over all candidates takes, for a caching oracle (``CachedOracle``, the map
feed's ``CachedMapView``) or a ``LinkStateOracle``, the candidates' paths and oracle rows
from ``CandidateView.cache``; the general route gathers them on every call
(``transfer_times``: the oracle's ``estimate`` plus ``Bookings.extra_seconds``). Random
states, bookings and requests; a view reused across decisions with its load arrays changed
in place (as the scheduler's ``Selector`` keeps it); results compared with ``==``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from netkv.core.congestion import CongestionMap
from netkv.core.costmodel import LinkStateOracle, static_tier_oracle
from netkv.core.paths import CachedOracle
from netkv.core.policies import (
    Bookings,
    CandidateView,
    DecodeModel,
    RequestView,
    predict,
    prediction,
)
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.routing.prefixes import PrefixIndex

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def topo() -> Topology:
    return parse_topology({"fabric": {"leaf_oversubscription": 2, "pod_oversubscription": 3},
                           "fat_tree": {"pods": 2, "leaves_per_pod": 2, "hosts_per_leaf": 4,
                                        "gpus_per_host": 8, "instance_gpus": 4}})


def _general(model: DecodeModel, req: RequestView, cands: CandidateView, oracle: object,
             bookings: Bookings | None) -> tuple[np.ndarray, ...]:
    """What predict computed before the cached routes: every gather on every call."""
    queue, first, nbytes = prediction.decode_side(model, req, cands, None)
    if type(oracle) is LinkStateOracle:
        transfer, tier = prediction._link_state_transfer(oracle, bookings, req.prefill_host,
                                                cands.host, nbytes)
    else:
        est = oracle.estimate(req.prefill_host, cands.host, nbytes)  # type: ignore[attr-defined]
        transfer, tier = est.seconds, est.tier
        if bookings is not None and bookings.active:
            transfer = transfer + bookings.extra_seconds(
                req.prefill_host, cands.host, nbytes, oracle.available_bytes_s)  # type: ignore[attr-defined]
    return queue, transfer, first, tier, nbytes


def _oracles(topo: Topology, rng: np.random.Generator) -> list[object]:
    now = time.time()
    cmap = CongestionMap(topo, clock=lambda: now)
    for i, link in enumerate(topo.links):
        cmap.observe_link(i, float(rng.uniform(0, 0.9)) * link.capacity_bytes_s,
                          now - float(rng.uniform(0, 3)))
    for a, b in ((0, 1), (0, 9), (2, 12), (5, 5)):
        cmap.observe_rtt(a, b, srtt_s=2e-4 * (a + 1), min_s=1e-4, p99_s=5e-4, loss=0.02,
                         ts=now - 0.2 * b)
    avail = topo.capacity * rng.uniform(0.05, 1.0, topo.n_links)
    return [CachedOracle(static_tier_oracle(topo)), cmap.cached(10.0, lambda: now),
            LinkStateOracle(topo, avail, topo.latency.copy())]


@pytest.mark.parametrize("seed", range(6))
def test_cached_routes_agree_with_the_general_path(topo: Topology, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3 * topo.n_hosts))
    hosts = rng.integers(0, topo.n_hosts, n).astype(np.int64)
    cands = CandidateView(host=hosts, running=rng.integers(0, 8, n).astype(np.int64),
                          waiting=rng.integers(0, 4, n).astype(np.int64),
                          kv_use=rng.uniform(0, 1, n),
                          capacity_tokens=rng.uniform(2e4, 5e5, n))
    model = DecodeModel()
    for oracle in _oracles(topo, rng):
        bookings = Bookings(topo)
        for step in range(40):
            if rng.random() < 0.5:  # the view's load changes in place between decisions
                cands.waiting[:] = rng.integers(0, 6, n)
                cands.kv_use[:] = rng.uniform(0, 1, n)
            src = int(rng.integers(topo.n_hosts))
            overlap = (None if rng.random() < 0.3
                       else rng.integers(0, 40, n).astype(np.int64))
            req = RequestView(prefill_host=src, prompt_tokens=int(rng.integers(1, 20_000)),
                              kv_bytes_per_token=327680.0, overlap_blocks=overlap,
                              output_tokens=int(rng.integers(0, 500)))
            used = bookings if step % 3 else None
            got = predict(model, req, cands, oracle, used)  # type: ignore[arg-type]
            want = _general(model, req, cands, oracle, used)
            for g, w in zip((got.queue_s, got.transfer_s, got.first_token_s, got.tier,
                             got.transfer_bytes), want, strict=True):
                assert g.dtype == w.dtype
                assert np.array_equal(g, w, equal_nan=True), type(oracle).__name__
            if rng.random() < 0.6:
                bookings.reserve(src, int(rng.integers(topo.n_hosts)),
                                 float(rng.uniform(1e6, 5e9)))
            if bookings.active and rng.random() < 0.2:
                bookings.release(bookings.reserve(0, int(rng.integers(topo.n_hosts)), 1e8))
        assert cands.cache  # the cached routes were taken


def test_prefix_overlap_matches_a_per_decoder_count() -> None:
    rng = np.random.default_rng(3)
    n = 37
    index = PrefixIndex(10_000)
    chains = [[10**6 * c + k for k in range(20)] for c in range(12)]
    for _ in range(300):
        chain = chains[int(rng.integers(len(chains)))]
        index.add(chain[: int(rng.integers(1, 21))], int(rng.integers(n)))
    held: dict[int, set[int]] = {}
    for h, mask in index._holders.items():
        held[h] = {d for d in range(n) if mask >> d & 1}
    for chain in chains:
        for length in (1, 5, 20):
            hashes = chain[:length]
            want = np.zeros(n, dtype=np.int64)
            for d in range(n):
                while want[d] < length and d in held.get(hashes[int(want[d])], set()):
                    want[d] += 1
            got = index.overlap(hashes, n)
            if not want.any():
                assert got is None or not got.any()
                continue
            assert got is not None and got.dtype == np.int64
            assert got.tolist() == want.tolist()
