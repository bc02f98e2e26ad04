"""``predict``'s cached route over a map feed's ``CachedMapView`` keeps the general path's
numbers bit for bit while the map changes between decisions (new observations, so a new link
view with new per-link rates each time) and own bookings are in flight: the rows, and the
booked links' rates kept beside them, must follow the view."""

from __future__ import annotations

import numpy as np
import pytest

from netkv.core.congestion import CongestionMap
from netkv.core.policies import Bookings, CandidateView, DecodeModel, RequestView, predict
from netkv.core.topology_file import parse_topology

pytestmark = pytest.mark.unit


def test_cached_rows_and_booked_rates_follow_a_changing_map() -> None:
    topo = parse_topology({"fabric": {"leaf_oversubscription": 2, "pod_oversubscription": 3},
                           "fat_tree": {"pods": 2, "leaves_per_pod": 2, "hosts_per_leaf": 4,
                                        "gpus_per_host": 8, "instance_gpus": 4}})
    rng = np.random.default_rng(11)
    now = [1000.0]
    cmap = CongestionMap(topo, clock=lambda: now[0])
    oracle = cmap.cached(0.05, lambda: now[0])
    n = topo.n_hosts
    cands = CandidateView(host=np.arange(n, dtype=np.int64),
                          running=np.zeros(n, dtype=np.int64),
                          waiting=rng.integers(0, 4, n).astype(np.int64),
                          kv_use=rng.uniform(0, 1, n), capacity_tokens=np.full(n, 5e5))
    bookings = Bookings(topo)
    model = DecodeModel()
    views = []  # every per-link rate array seen (kept, so ids are not reused)
    for step in range(120):
        now[0] += 0.02
        if step % 4 == 0:  # new measurements: the next decision sees a new link view
            for i in rng.choice(topo.n_links, 6, replace=False):
                cmap.observe_link(int(i), float(rng.uniform(0, 0.95))
                                  * topo.links[int(i)].capacity_bytes_s, now[0])
        src = int(rng.integers(n))
        req = RequestView(prefill_host=src, prompt_tokens=int(rng.integers(1, 20_000)),
                          kv_bytes_per_token=327680.0,
                          overlap_blocks=rng.integers(0, 30, n).astype(np.int64))
        got = predict(model, req, cands, oracle, bookings)
        est = oracle.estimate(src, cands.host, got.transfer_bytes)
        want = est.seconds
        if bookings.active:
            want = want + bookings.extra_seconds(src, cands.host, got.transfer_bytes,
                                                 oracle.available_bytes_s)
        assert np.array_equal(got.transfer_s, want)
        assert np.array_equal(got.tier, est.tier)
        views.append(oracle.available_bytes_s)
        bookings.reserve(src, int(rng.integers(n)), float(rng.uniform(1e8, 5e9)))
    assert bookings.active
    assert len({id(v) for v in views}) >= 25  # the map view did change under the decisions
