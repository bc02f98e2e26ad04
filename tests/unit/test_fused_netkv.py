"""The selector's fused ``netkv`` decision gives the policy's own decisions, bit for bit.

:class:`~netkv.routing.fused.FusedNetkv` re-evaluates ``Netkv.decide`` over ``predict`` in
fewer calls, and the selector around it was made cheaper (prefix overlaps summed per holder
set, the candidate view's identity check). Each test drives two selectors through the same
sequence on the same fake clock: one as it is now, one with the fused path off and copies of
the code as it was before (``_old_overlap``, ``_OldCandidateViews``). After every step it
compares everything a decision leaves behind: the Decision (every field, the scores' bytes),
the names answered, the bookings' per-link arrays, the open reservations, the prefix index in
LRU order and the tie-breaker's generator state. Sequences are random and hostile: ties (no
map, equal loads), a stale map, a map refreshed under the decisions, KV queues (tiny
capacities, huge outputs), empty, repeated and unseen block hashes, re-booked ids,
releases, instances registered and removed, |D| from 1 to 1,024 and several decoders per
host. Deliberately broken variants must fail the same comparison. Every test runs twice: with
the C modules (:mod:`netkv.routing.native`: the decision kernel and the prefix loops; skipped
with the reason where they were not built) and on the Python path.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from netkv.core.congestion import CongestionMap
from netkv.core.policies import CandidateView
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError
from netkv.routing import InstanceReport, MapFeed, Selector, SelectorConfig, SelectRequest
from netkv.routing import fused as fused_module
from netkv.routing import prefixes as prefixes_module
from netkv.routing.fused import FusedNetkv
from netkv.routing.prefixes import PrefixIndex

pytestmark = pytest.mark.unit

KV_BYTES = 327680.0


@pytest.fixture(autouse=True, params=["native", "python"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The path under test: the C modules, or Python and numpy (the modules taken away)."""
    if request.param == "native" and not (fused_module.KERNEL_BUILT
                                           and prefixes_module._native is not None):
        pytest.skip("netkv.routing's C modules were not built (no C compiler at install time)")
    if request.param == "python":
        monkeypatch.setattr(fused_module, "_kernel", None)
        monkeypatch.setattr(prefixes_module, "_native", None)
    return str(request.param)


# -- the code as it was before (copies) -------------------------------------------------------
def _old_overlap(self: PrefixIndex, hashes: Sequence[int], n_decoders: int) -> Any:
    holders = self._holders
    alive = holders.get(hashes[0], 0) if hashes else 0
    if not alive:
        return None
    runs: list[list[int]] = [[alive, 1]]
    for h in hashes[1:]:
        alive &= holders.get(h, 0)
        if not alive:
            break
        if alive == runs[-1][0]:
            runs[-1][1] += 1
        else:
            runs.append([alive, 1])
    if len(runs) == 1:
        return self.bits(runs[0][0], n_decoders) * runs[0][1]
    width = (n_decoders + 7) // 8
    low = (1 << n_decoders) - 1
    raw = b"".join((mask & low).to_bytes(width, "little") for mask, _ in runs)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    counts = np.fromiter((count for _, count in runs), dtype=np.int64, count=len(runs))
    return counts @ bits.reshape(len(runs), width * 8)[:, :n_decoders]


class _OldCandidateViews:
    def __init__(self) -> None:
        self._view: CandidateView | None = None
        self._key: tuple[Any, ...] = ()

    def get(self, host: Any, running: Any, waiting: Any, kv_use: Any, capacity_tokens: Any,
            *, extra_waiting: Any) -> CandidateView:
        key = (host, running, waiting, kv_use, capacity_tokens, extra_waiting)
        view = self._view
        if view is None or any(a is not b for a, b in zip(key, self._key, strict=True)):
            view = self._view = CandidateView(
                host=host, running=running, waiting=waiting + extra_waiting, kv_use=kv_use,
                capacity_tokens=capacity_tokens)
            self._key = key
        else:
            np.add(waiting, extra_waiting, out=view.waiting)
        return view


# -- two selectors, one sequence ------------------------------------------------------------
def _topology(hosts: int, per_host: int = 1) -> Topology:
    """A fat-tree with ``hosts`` hosts, one prefill and ``per_host`` decode instances each."""
    hpl = next(h for h in (16, 8, 4, 2, 1) if (hosts % h == 0 and hosts // h >= 4) or h == 1)
    rest = hosts // hpl
    pods = next(p for p in (8, 4, 2, 1) if (rest % p == 0 and rest // p >= 2) or p == 1)
    gpus = {1: (8, 4), 3: (8, 2)}[per_host]
    return parse_topology({"fabric": {"leaf_oversubscription": 2, "pod_oversubscription": 3},
                           "fat_tree": {"pods": pods, "leaves_per_pod": rest // pods,
                                        "hosts_per_leaf": hpl, "gpus_per_host": gpus[0],
                                        "instance_gpus": gpus[1]}})


class Pair:
    """The selector as it is (``new``) and as it was (``old``), on one fake clock."""

    def __init__(self, topology: Topology, *, with_map: bool, seed: int,
                 policy_params: dict[str, dict[str, Any]] | None = None,
                 capacity_tokens: float = 500_000.0) -> None:
        self.now = 1000.0
        self.topology = topology
        self.rng = np.random.default_rng(seed)
        self.maps: list[CongestionMap] = []
        config = SelectorConfig(bytes_per_token=KV_BYTES, reservation_ttl_s=2.0,
                                policy_params=policy_params or {},
                                capacity_tokens=capacity_tokens, prefix_blocks=1024,
                                registration_ttl_s=5.0)
        self.new = self._selector(config, with_map, fused=True)
        self.old = self._selector(config, with_map, fused=False)
        self.old.prefixes.overlap = _old_overlap.__get__(self.old.prefixes)  # type: ignore[method-assign]
        self.old.prefixes._c = None  # the Python loops, always
        self.old._views = _OldCandidateViews()  # type: ignore[assignment]

    def clock(self) -> float:
        return self.now

    def _selector(self, config: SelectorConfig, with_map: bool, *, fused: bool) -> Selector:
        feed = MapFeed(self.topology, None, None, stale_s=3.0, cache_s=0.05, clock=self.clock)
        if with_map:
            cmap = CongestionMap(self.topology, clock=self.clock)
            rng = np.random.default_rng(7)
            for i, link in enumerate(self.topology.links):
                cmap.observe_link(i, float(rng.uniform(0, 0.9)) * link.capacity_bytes_s,
                                  self.now)
            cmap.version, cmap.created_ts = 1, self.now
            feed.install(cmap)
            self.maps.append(cmap)
        return Selector(config, self.topology, feed, clock=self.clock, fused=fused)

    def refresh_map(self) -> None:
        """New observations on a few links of both maps (the same ones)."""
        links = self.rng.choice(self.topology.n_links, min(4, self.topology.n_links),
                                replace=False)
        shares = [float(x) for x in self.rng.uniform(0, 0.95, len(links))]
        for cmap in self.maps:
            for i, share in zip([int(x) for x in links], shares, strict=True):
                cmap.observe_link(i, share * self.topology.links[i].capacity_bytes_s,
                                  self.now)

    def both(self, call: Callable[[Selector], Any]) -> tuple[Any, Any]:
        """``call`` on each selector: the results, or the InputErrors' (where, message)."""
        out = []
        for sel in (self.new, self.old):
            try:
                out.append(call(sel))
            except InputError as exc:
                out.append(("error", exc.where, exc.message))
        return out[0], out[1]


def _same_state(new: Selector, old: Selector) -> None:
    assert new.bookings.bytes_ext.tobytes() == old.bookings.bytes_ext.tobytes()
    assert new.bookings.flows_ext.tobytes() == old.bookings.flows_ext.tobytes()
    assert new.bookings.active == old.bookings.active
    assert new.reservations.pending.tobytes() == old.reservations.pending.tobytes()
    assert list(new.reservations.open) == list(old.reservations.open)
    assert list(new.prefixes._holders.items()) == list(old.prefixes._holders.items())
    for name, engine in new.engines.items():
        rng_new = getattr(engine.policy, "ties", None)
        if rng_new is not None:
            rng_old = old.engines[name].policy.ties  # type: ignore[attr-defined]
            assert rng_new.rng.bit_generator.state == rng_old.rng.bit_generator.state, name


def _same_choice(a: Any, b: Any) -> None:
    if isinstance(a, tuple) or isinstance(b, tuple):
        assert a == b
        return
    da, db = a.decision, b.decision
    for field in ("index", "ttft_s", "queue_s", "transfer_s", "first_token_s", "tier",
                  "transfer_bytes", "prefill_index", "prefill_s"):
        va, vb = getattr(da, field), getattr(db, field)
        assert type(va) is type(vb), field
        if isinstance(va, float):
            assert va.hex() == vb.hex(), field  # bit for bit: signed zeros and NaNs too
        else:
            assert va == vb, field
    assert (da.scores is None) == (db.scores is None)
    if da.scores is not None:
        assert da.scores.dtype == db.scores.dtype
        assert da.scores.tobytes() == db.scores.tobytes()
    assert (a.decoder.name, a.prefill.name, a.policy, a.reserved) == \
        (b.decoder.name, b.prefill.name, b.policy, b.reserved)
    assert (a.view.version, a.view.stale, a.view.age_s) == \
        (b.view.version, b.view.stale, b.view.age_s)


def _hashes(rng: random.Random, pool: int) -> tuple[int, ...]:
    kind = rng.random()
    if kind < 0.1:
        return ()
    if kind < 0.15:  # hostile: one block repeated, or huge and unseen
        return (rng.randrange(pool),) * rng.randint(1, 40) if rng.random() < 0.5 else \
            tuple(rng.randrange(2**62, 2**63) for _ in range(rng.randint(1, 8)))
    shared = [0] + [1000 + rng.randrange(12) * 100 + k for k in range(rng.randint(0, 6))]
    tail = [rng.randrange(pool) for _ in range(rng.randint(0, 12))]
    return tuple(shared + tail)


def drive(pair: Pair, steps: int, seed: int, *, policies: Sequence[str | None] = (None,),
          dt_s: float = 0.002, refresh_every: int = 0, stale_at: int = -1,
          churn: bool = False) -> int:
    """``steps`` random operations on both selectors; returns the decisions compared."""
    rng = random.Random(seed)
    prefills = [i.name for i in pair.topology.instances if i.role == "prefill"]
    decoders = [i.name for i in pair.topology.instances if i.role == "decode"]
    hosts = [h.name for h in pair.topology.hosts]
    ids: list[str] = []
    decided = 0
    for step in range(steps):
        pair.now += dt_s * rng.random()
        if step == stale_at:
            pair.now += 10.0  # past stale_s: tier priors from here on
        if refresh_every and step % refresh_every == 0:
            pair.refresh_map()
        op = rng.random()
        if op < 0.75:
            rid = rng.choice(ids) if ids and rng.random() < 0.1 else f"r{step}"
            ids.append(rid)
            tokens = rng.choice((1, 511, 512, 513, rng.randint(1, 20_000),
                                 rng.randint(1, 20_000), 10_000_000))
            body = SelectRequest(
                request_id=rid, prefill=rng.choice(prefills), prompt_tokens=tokens,
                output_tokens=rng.choice((0, 0, 64, rng.randint(0, 10_000_000))),
                block_hashes=_hashes(rng, 64), policy=rng.choice(policies),
                reserve=rng.random() < 0.9)
            a, b = pair.both(lambda s, body=body: s.select(body))  # type: ignore[misc]
            _same_choice(a, b)
            decided += 1
        elif op < 0.87 and ids:
            rid = rng.choice(ids)
            a, b = pair.both(lambda s, rid=rid: s.release(rid))  # type: ignore[misc]
            assert (a is None) == (b is None) and (a is None or a.name == b.name)
        elif op < 0.97:
            name = rng.choice(decoders)
            report = InstanceReport(name=name, waiting=float(rng.randint(0, 6)),
                                    running=float(rng.randint(0, 6)),
                                    kv_use=rng.choice((0.0, 0.0, 0.5, rng.random(), 1.0)),
                                    capacity_tokens=rng.choice((None, 600.0, 1e6)))
            pair.both(lambda s, r=report: s.register(r).name)  # type: ignore[misc]
        elif churn and rng.random() < 0.5:  # a decoder registered (|D| grows) ...
            name = f"extra{step}"
            report = InstanceReport(name=name, role="decode", host=rng.choice(hosts))
            a, b = pair.both(lambda s, r=report: s.register(r).name)  # type: ignore[misc]
            assert a == b
            decoders.append(name)
        elif churn:  # ... or removed (indices shift, the prefix index is cleared)
            extra = [d for d in decoders if d.startswith("extra")]
            if extra:
                gone = rng.choice(extra)
                decoders.remove(gone)
                a, b = pair.both(lambda s, g=gone: s.remove([g]))  # type: ignore[misc]
                assert a == b
        _same_state(pair.new, pair.old)
    return decided


# -- the sequences --------------------------------------------------------------------------
@pytest.mark.parametrize(("hosts", "per_host", "steps"), [
    (1, 1, 300), (2, 1, 300), (3, 1, 300), (5, 1, 300), (16, 1, 800), (16, 3, 600),
    (64, 1, 800), (1024, 1, 150)])
def test_random_sequences_decide_identically(hosts: int, per_host: int, steps: int,
                                            path: str) -> None:
    pair = Pair(_topology(hosts, per_host), with_map=True, seed=hosts)
    decided = drive(pair, steps, seed=hosts * 7 + per_host, refresh_every=25,
                    policies=(None, None, None, "netkv", "least_loaded", "netkv_pair"))
    assert decided > steps // 2
    assert pair.new.engines["netkv"].count == pair.old.engines["netkv"].count > 0
    assert pair.new.fused["netkv"].decided > 0 and not pair.old.fused
    assert (pair.new.fused["netkv"].kernel is not None) == (path == "native")
    assert (pair.new.prefixes._c is not None) == (path == "native")


def test_ties_without_a_map_and_a_stale_map_decide_identically() -> None:
    """No map (tier priors: whole tiers tie), equal loads, then a map that goes stale."""
    pair = Pair(_topology(16), with_map=False, seed=3)
    drive(pair, 600, seed=5)
    stale = Pair(_topology(16, 3), with_map=True, seed=4)
    drive(stale, 600, seed=6, stale_at=300)
    assert stale.new.feed.view().stale


def test_queues_hostile_parameters_and_churn_decide_identically() -> None:
    """Tiny KV capacities (queue deficits), a handover cost, the tier tie rule, no bookings,
    decoders registered and removed between decisions."""
    for params in ({"handover_s": 0.002, "tie_rel": 0.3},
                   {"tie_rule": "tier", "use_bookings": False},
                   {"tie_rel": 0.0, "seed": 9}):
        pair = Pair(_topology(16), with_map=True, seed=8, capacity_tokens=800.0,
                    policy_params={"netkv": params})
        drive(pair, 500, seed=11, refresh_every=40, churn=True)


def test_a_fixed_12000_decision_sequence_is_identical() -> None:
    """The bench's kind of load at |D| = 64 (a shared system block, conversations, unique
    turns; every select books), 12,000 decisions on a map refreshed under them."""
    topology = _topology(64)
    pair = Pair(topology, with_map=True, seed=1)
    rng = random.Random(2)
    for i in range(12_000):
        pair.now += 0.0002
        if i % 500 == 0:
            pair.refresh_map()
        tokens = rng.randint(500, 16000)
        blocks = -(-tokens // 512)
        conversation = rng.randrange(200)
        history = min(rng.randrange(blocks), 8)
        hashes = [0] + [1_000 + conversation * 100 + k for k in range(history)]
        hashes += [10**6 + i * 64 + k for k in range(blocks - len(hashes))]
        body = SelectRequest(request_id=f"b{i}", prefill=f"h{rng.randrange(64):03d}-p0",
                             prompt_tokens=tokens, block_hashes=tuple(hashes[:blocks]))
        a, b = pair.both(lambda s, body=body: s.select(body))  # type: ignore[misc]
        _same_choice(a, b)
        if i % 100 == 0:
            _same_state(pair.new, pair.old)
    _same_state(pair.new, pair.old)
    assert pair.new.bookings.active > 0
    assert pair.new.fused["netkv"].decided == 12_000


def test_no_decoders_is_refused_the_same_way() -> None:
    """An empty candidate set never reaches a policy: a topology without decode instances
    cannot build a selector, fused or not; a decoder named as the prefill is refused."""
    only_prefill = parse_topology({"fat_tree": {"pods": 1, "leaves_per_pod": 2,
                                                "hosts_per_leaf": 1, "gpus_per_host": 8,
                                                "instance_gpus": 4, "role_pattern": "PP"}})
    top = _topology(2)
    for fused in (True, False):
        with pytest.raises(InputError) as empty:
            Selector(SelectorConfig(bytes_per_token=KV_BYTES), only_prefill,
                     MapFeed(only_prefill, None, None), fused=fused)
        assert empty.value.where == "topology"
        sel = Selector(SelectorConfig(bytes_per_token=KV_BYTES), top, MapFeed(top, None, None),
                       fused=fused)
        with pytest.raises(InputError) as bad:
            sel.select(SelectRequest(request_id="x", prefill="h000-d1", prompt_tokens=5))
        assert bad.value.where == "body.prefill"


# -- a broken fused path must fail the comparison -------------------------------------------
def _broken_queue(self: Any, *args: Any, **kw: Any) -> Any:
    decision = _ORIGINAL(self, *args, **kw)
    return decision.__class__(**{**{f: getattr(decision, f) for f in decision.__slots__},
                                 "queue_s": decision.queue_s + 1e-12})


def _broken_bookings(self: Any, *args: Any, **kw: Any) -> Any:
    saved, self.use_bookings = self.use_bookings, False
    try:
        return _ORIGINAL(self, *args, **kw)
    finally:
        self.use_bookings = saved


def _broken_ties(self: Any, *args: Any, **kw: Any) -> Any:
    saved, self.tie_rule = self.tie_rule, "tier"
    try:
        return _ORIGINAL(self, *args, **kw)
    finally:
        self.tie_rule = saved


_ORIGINAL = fused_module.FusedNetkv._decide


def _broken_draw(self: Any, *args: Any, **kw: Any) -> Any:
    """Equal KV use taken for granted: the draw among near candidates without the KV
    comparison (wrong as soon as the loads differ)."""
    saved, saved_kernel = FusedNetkv._load_bounds, FusedNetkv._kernel_loads
    FusedNetkv._load_bounds = lambda s, c, v: (*saved(s, c, v)[:2], True)  # type: ignore[method-assign,assignment]
    FusedNetkv._kernel_loads = lambda s, c, v, k, b: (  # type: ignore[method-assign,assignment]
        *(got := saved_kernel(s, c, v, k, b))[:2], True, *got[3:])
    try:
        return _ORIGINAL(self, *args, **kw)
    finally:
        FusedNetkv._load_bounds = saved  # type: ignore[method-assign]
        FusedNetkv._kernel_loads = saved_kernel  # type: ignore[method-assign]


@pytest.mark.parametrize("broken", [_broken_queue, _broken_bookings, _broken_ties,
                                    _broken_draw])
def test_a_broken_fused_path_fails_the_comparison(broken: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_module.FusedNetkv, "_decide", broken)
    pair = Pair(_topology(16), with_map=True, seed=2)
    with pytest.raises(AssertionError):
        drive(pair, 400, seed=3, refresh_every=25)


@pytest.mark.parametrize("where", ["runs", "from_runs"])
def test_a_broken_overlap_fails_the_comparison(where: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Held blocks one short (the fused path reads ``runs``; the policies' own path, for
    the other policies here, reads ``from_runs``)."""
    def short_runs(self: PrefixIndex, hashes: Sequence[int]) -> Any:
        runs = PrefixIndex.runs(self, hashes)
        return runs if runs is None or runs[0][1] < 2 else [[runs[0][0], runs[0][1] - 1],
                                                            *runs[1:]]

    def short_overlap(self: PrefixIndex, runs: Any, n: int) -> Any:
        out = PrefixIndex.from_runs(self, runs, n)
        out[out > 1] -= 1
        return out

    pair = Pair(_topology(16), with_map=True, seed=2)
    broken = short_runs if where == "runs" else short_overlap
    monkeypatch.setattr(pair.new.prefixes, where, broken.__get__(pair.new.prefixes))
    with pytest.raises(AssertionError):
        drive(pair, 400, seed=3, policies=(None, "least_loaded", "cache_aware", "netkv_pair"))


def test_a_wrong_queue_bound_fails_the_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path skips the KV-queue arithmetic when a bound says no decoder can queue:
    a bound that always says so must be caught (tiny capacities do queue)."""
    monkeypatch.setattr(fused_module.FusedNetkv, "_load_bounds",
                        lambda self, candidates, version: (0.0, float("inf"), False))
    pair = Pair(_topology(16), with_map=True, seed=2, capacity_tokens=800.0)
    with pytest.raises(AssertionError):
        drive(pair, 400, seed=3)


def test_holder_flags_match_the_unpacked_bits() -> None:
    """``PrefixIndex.flags`` (one AND, up to 64 decoders) is ``bits(...) != 0`` for any
    mask, also with bits past the decoder count (decoders removed)."""
    index = PrefixIndex()
    rng = random.Random(4)
    for n in (1, 2, 7, 8, 9, 63, 64, 65, 130):
        for _ in range(50):
            mask = rng.getrandbits(n + 3) | (1 << rng.randrange(n))
            assert np.array_equal(index.flags(mask, n), index.bits(mask, n) != 0)


def test_the_prefix_loops_in_c_match_the_python_ones(path: str) -> None:
    """``PrefixIndex.runs`` and ``add`` (C where built) against the Python loops on random,
    hostile holdings: every run, the dict's contents in LRU order, evictions, > 64 bits."""
    if path != "native":
        pytest.skip("compares the C loops with the Python ones")
    rng = random.Random(12)
    for n, pool in ((3, 20), (64, 200), (130, 60), (1024, 40)):
        fast, slow = PrefixIndex(max_blocks=97), PrefixIndex(max_blocks=97)
        slow._c = None
        assert fast._c is not None
        for _ in range(600):
            hashes = tuple(rng.randrange(pool) for _ in range(rng.randint(0, 30)))
            if rng.random() < 0.3:
                hashes = (rng.randrange(pool),) * rng.randint(1, 5) + hashes
            assert fast.runs(hashes) == slow.runs(hashes)
            if hashes and rng.random() < 0.7:
                decoder = rng.randrange(n)
                fast.add(hashes, decoder)
                slow.add(hashes, decoder)
                assert list(fast._holders.items()) == list(slow._holders.items())
        assert fast.runs(()) is None and slow.runs(()) is None
        with pytest.raises(TypeError):
            fast.runs(7)  # type: ignore[arg-type]


def test_the_kernels_draws_are_numpys_or_not_used() -> None:
    """The kernel draws ties in C only after a check against ``Generator.integers``; a draw
    that differs in value (or uses the generator differently) fails the check."""
    assert fused_module.DRAWS_IN_C == fused_module.KERNEL_BUILT
    assert not fused_module._draws_match(None)

    class OffByOne:
        @staticmethod
        def integers(capsule: Any, k: int) -> int:
            return (int(np.random.Generator(np.random.PCG64()).integers(k)) + 1) % k

    class ExtraDraw:
        @staticmethod
        def integers(capsule: Any, k: int) -> int:
            assert fused_module._kernel is not None
            fused_module._kernel.integers(capsule, 2)  # one draw too many: the stream shifts
            return int(fused_module._kernel.integers(capsule, k))

    assert not fused_module._draws_match(OffByOne)  # type: ignore[arg-type]
    if fused_module._kernel is not None:
        assert not fused_module._draws_match(ExtraDraw)  # type: ignore[arg-type]
