"""The proxy's placement keeps one candidate view across decisions (netkv.routing.candidates)
and still sees every load change: the reused view decides as a fresh one would."""

from __future__ import annotations

import numpy as np
import pytest
from netkv_proxy.config import WorkerEntry
from netkv_proxy.placement import Placed, Placement
from netkv_proxy.workers import WorkerPool

from netkv.core.policies import CandidateView
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError

pytestmark = pytest.mark.unit

TOPOLOGY = {
    "fabric": {"nic_gbps": 400, "leaf_oversubscription": 1, "pod_oversubscription": 1},
    "hosts": [{"name": f"h{i}", "leaf": f"l{i % 2}", "pod": "p0"} for i in range(5)],
    "instances": [{"name": "p0", "role": "prefill", "host": "h0"},
                  *({"name": f"d{i}", "role": "decode", "host": f"h{i + 1}"}
                    for i in range(4))],
}


def placement(policy: str = "netkv", *, fused: bool = True) -> Placement:
    topo = parse_topology(TOPOLOGY)
    pool = WorkerPool((WorkerEntry(url="http://127.0.0.1:9000", host="p0"),),
                      tuple(WorkerEntry(url=f"http://127.0.0.1:{9100 + i}", host=f"d{i}")
                            for i in range(4)), topo, eject_after=1, readmit_after=1)
    return Placement(topo, pool, feed=None, policy=policy, policy_params={},
                     bytes_per_token=327_680.0, capacity_tokens=500_000.0, block_tokens=16,
                     prefix_blocks=1000, fused=fused)


def fresh(p: Placement) -> CandidateView:
    """The view the proxy built before the reuse: new arrays from the workers' state."""
    ds = p.pool.decodes
    running = np.array([w.running for w in ds])
    waiting = np.array([w.waiting for w in ds])
    inflight = np.array([w.inflight for w in ds], dtype=np.float64)
    total = waiting + np.maximum(inflight - running - waiting, 0.0)
    return CandidateView(host=np.array([w.host_index for w in ds], dtype=np.int64),
                         running=running.astype(np.int64), waiting=total.astype(np.int64),
                         kv_use=np.array([w.kv_use for w in ds]),
                         capacity_tokens=np.full(len(ds), 500_000.0))


def test_one_view_is_kept_and_refilled_with_the_current_load() -> None:
    p = placement()
    ds = p.pool.decodes
    first = p._candidates(ds)
    ds[1].running, ds[1].waiting, ds[2].inflight, ds[3].kv_use = 3.0, 2.0, 7, 0.5
    second = p._candidates(ds)
    assert second is first  # the policies' per-view caches live on
    want = fresh(p)
    for name in ("host", "running", "waiting", "kv_use", "capacity_tokens"):
        assert np.array_equal(getattr(second, name), getattr(want, name)), name
    assert second.waiting[2] == 7 and second.waiting[1] == 2  # in flight beyond the scrape


def test_an_ejected_decode_gives_a_view_of_the_admitted_ones() -> None:
    p = placement()
    ds = p.pool.decodes
    full = p._candidates(ds)
    ds[0].healthy = False
    part = p._candidates(p.pool.healthy("decode"))
    assert part is not full and list(part.host) == [w.host_index for w in ds[1:]]
    ds[0].healthy = True
    assert len(p._candidates(p.pool.healthy("decode"))) == 4


def test_decisions_over_the_kept_view_match_a_fresh_view() -> None:
    """The same choices, predictions and bookings as a view built anew for each request."""
    p, q = placement(), placement()
    prefill_p, prefill_q = p.pool.prefills[0], q.pool.prefills[0]
    rng = np.random.default_rng(7)
    held_p, held_q = [], []
    for i in range(60):
        for a, b in zip(p.pool.decodes, q.pool.decodes, strict=True):
            a.running = b.running = float(rng.integers(0, 6))
            a.waiting = b.waiting = float(rng.integers(0, 3))
        tokens = int(rng.integers(100, 20_000))
        hashes = [int(x) for x in rng.integers(0, 1 << 40, tokens // 16 // 64)]
        got = p.place(prefill_p, tokens, hashes, 16)
        q._views.get = lambda *a, **k: fresh(q)  # type: ignore[method-assign]
        want = q.place(prefill_q, tokens, hashes, 16)
        assert got is not None and want is not None
        assert got.decode.index == want.decode.index, i
        assert got.decision.ttft_s == pytest.approx(want.decision.ttft_s, rel=1e-12)
        held_p.append(got)
        held_q.append(want)
        if i % 3 == 2:  # release some, so the bookings move too
            p.release(held_p.pop(0))
            q.release(held_q.pop(0))
    for placed in held_p:
        p.release(placed)
    assert p.bookings.active == 0 and not p.open


def test_an_unknown_policy_names_the_setting() -> None:
    with pytest.raises(InputError, match="proxy.policy"):
        placement("no_such_policy")


def test_the_element_fill_equals_the_numpy_fill() -> None:
    """Up to ``_LOOP_FILL_MAX`` decodes the kept view is filled element by element; the
    arrays are the numpy path's, fractional gauges and in-flight counts included."""
    p, q = placement(), placement()
    rng = np.random.default_rng(11)
    for _ in range(200):
        for a, b in zip(p.pool.decodes, q.pool.decodes, strict=True):
            a.running = b.running = float(rng.choice([0.0, 1.0, 2.5, 7.0, 3.999]))
            a.waiting = b.waiting = float(rng.choice([0.0, 0.5, 2.0, 4.25]))
            a.inflight = b.inflight = int(rng.integers(0, 12))
            a.kv_use = b.kv_use = float(rng.random())
        got = p._candidates(p.pool.decodes)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("netkv_proxy.placement._LOOP_FILL_MAX", 0)  # the numpy path
            want = q._candidates(q.pool.decodes)
        for name in ("host", "running", "waiting", "kv_use", "capacity_tokens"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), name
        assert np.array_equal(got.waiting, fresh(p).waiting)



def _key(placed: Placed) -> tuple[object, ...]:
    d = placed.decision
    return (placed.decode.index, d.index, d.ttft_s, d.transfer_s, d.queue_s, d.tier,
            d.transfer_bytes, None if d.scores is None else d.scores.tobytes())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_fused_decisions_equal_the_policys_own(seed: int) -> None:
    """With every decode admitted the proxy decides ``netkv`` through FusedNetkv; over random
    loads, KV use, shared and fresh prefixes, releases and an ejected decode, every decision
    equals the policy's own ``decide`` bit for bit, and so do the bookings and the index."""
    p, q = placement(), placement(fused=False)
    assert p.fused is not None and q.fused is None
    rng = np.random.default_rng(seed)
    shared = [int(x) for x in rng.integers(0, 1 << 40, 64)]
    held: list[tuple[Placed, Placed]] = []
    for i in range(400):
        ejected = i % 50 > 44
        for a, b in zip(p.pool.decodes, q.pool.decodes, strict=True):
            a.running = b.running = float(rng.integers(0, 6))
            a.waiting = b.waiting = float(rng.choice([0.0, 0.0, 1.0, 2.5]))
            a.kv_use = b.kv_use = float(rng.choice([0.0, 0.25, float(rng.random())]))
            a.healthy = b.healthy = not (ejected and a.index == 2)
        tokens = int(rng.integers(16, 40_000))
        blocks = -(-tokens // 16)
        cut = int(rng.integers(0, min(blocks, len(shared)) + 1))
        hashes = shared[:cut] + [int(x) for x in rng.integers(0, 1 << 40, blocks - cut)]
        if rng.random() < 0.1:
            hashes = []
        out = int(rng.integers(0, 512))
        got = p.place(p.pool.prefills[0], tokens, hashes, out)
        want = q.place(q.pool.prefills[0], tokens, hashes, out)
        assert got is not None and want is not None
        assert _key(got) == _key(want), i
        held.append((got, want))
        if rng.random() < 0.4:
            a_placed, b_placed = held.pop(int(rng.integers(0, len(held))))
            p.transferred(a_placed)
            q.transferred(b_placed)
            p.release(a_placed)
            q.release(b_placed)
        assert p.bookings.active == q.bookings.active
    assert p.fused.decided > 300  # the fused path decided (not only the fallback)
    assert list(p.prefix._holders.items()) == list(q.prefix._holders.items())
    for a_placed, b_placed in held:
        p.release(a_placed)
        q.release(b_placed)
    assert p.bookings.active == q.bookings.active == 0
