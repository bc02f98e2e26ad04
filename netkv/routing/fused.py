"""``netkv``'s decision for a router's usual inputs, fused: the same numbers, fewer calls.

:meth:`Netkv.decide <netkv.core.policies.Netkv.decide>` over
:func:`~netkv.core.policies.predict` is written for every owner (the simulator's views,
optional per-candidate NIC rates, streamed transfers, any cost oracle) and builds a
:class:`~netkv.core.policies.RequestView`, a :class:`~netkv.core.policies.Prediction` and
about fifty small arrays per decision; at |D| = 64 numpy's ~1 µs per call and the frozen
dataclasses are most of a decision's cost. :class:`FusedNetkv` evaluates the same formula
for what the scheduler's :class:`~netkv.routing.selector.Selector` passes (a caching oracle
answering from per-source rows, no per-candidate NIC rates, token queues or step times, no
streaming), as one pass over arrays preallocated per candidate count (written with ``out=``),
with the candidates' rows of the oracle and their booked links' rates gathered once per row
and view. Every operation is the core's, on the same operands in the same order, so the
results are bit for bit the core's (``tests/unit/test_fused_netkv.py`` compares them on
random and hostile sequences); anything else falls back to the core (:meth:`decide`
returns ``None``).

Where the C kernel :mod:`netkv.routing._kernel` was built (``hatch_build.py``, whenever a C
compiler is present), the arithmetic after the cached gathers runs there in one call: the
same operations in the same order, the same tie-break draws, so the same bits (the tests run
every comparison on both paths); ``FusedNetkv(engine, kernel=False)``, or a missing build,
keeps the numpy path.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import numpy as np

from netkv.core.congestion import CachedMapView
from netkv.core.costmodel import CostEstimate, CostOracle
from netkv.core.paths import CachedOracle
from netkv.core.policies import Bookings, CandidateView, Decision, DecisionEngine, Netkv
from netkv.core.policies.network import near_ties, prefer_lower_tier
from netkv.core.topology import BoolArray, FloatArray, IntArray
from netkv.routing import native
from netkv.routing.prefixes import PrefixIndex

_kernel = native.load("_kernel", abi=3)  # the decide() called here (see PyInit__kernel)
KERNEL_BUILT = _kernel is not None


def _draws_match(kernel: ModuleType | None) -> bool:
    """Whether the kernel's tie-break draw is this numpy's ``Generator.integers``, value for
    value and state for state (checked once: otherwise the kernel calls
    ``integers`` itself, about 3 µs a draw)."""
    if kernel is None:
        return False
    for seed in (0, 1, 2**40 + 7):
        ours, theirs = np.random.default_rng(seed), np.random.default_rng(seed)
        for k in (2, 3, 5, 7, 64, 1000, 3**19, 2**31):
            for _ in range(40):
                if kernel.integers(ours.bit_generator.capsule, k) != int(theirs.integers(k)):
                    return False
        if ours.bit_generator.state != theirs.bit_generator.state:
            return False
    return True


DRAWS_IN_C = _draws_match(_kernel)
_ROWS = "fused-row"  # this module's key in ``CandidateView.cache`` (per source host)
_Buffer = FloatArray | memoryview  # what the kernel reads an array from


class _Buffers:
    """Scratch arrays for one candidate count."""

    __slots__ = ("competing", "extra", "first", "flows", "mask", "n", "nbytes", "other",
                 "outputs", "queue", "rate", "transfer", "used")

    def __init__(self, n: int, tbt_s: float) -> None:
        self.n = n
        self.nbytes: FloatArray = np.empty(n)
        self.queue: FloatArray = np.empty(n)
        self.used: FloatArray = np.empty(n)
        self.rate: FloatArray = np.empty(n)
        self.transfer: FloatArray = np.empty(n)
        self.extra: FloatArray = np.empty(n)
        self.first: FloatArray = np.full(n, tbt_s)
        self.first.flags.writeable = False
        self.flows: FloatArray = np.empty((6, n))
        self.competing: FloatArray = np.empty((6, n))
        self.mask: BoolArray = np.empty(n, dtype=np.bool_)
        self.other: BoolArray = np.empty(n, dtype=np.bool_)
        # the kernel's outputs as memoryviews of the same arrays: exporting a memoryview's
        # buffer costs a tenth of an ndarray's
        self.outputs = (self.nbytes.data, self.queue.data, self.transfer.data)


class FusedNetkv:
    """One ``netkv`` engine's decisions, fused (see the module docstring)."""

    def __init__(self, engine: DecisionEngine, *, kernel: bool = True) -> None:
        """``kernel``: decide in the C kernel where it was built (off: the numpy path)."""
        policy = engine.policy
        if type(policy) is not Netkv:
            raise TypeError(f"FusedNetkv evaluates netkv, not {type(policy).__name__}")
        self.engine = engine
        self.bookings: Bookings = engine.bookings
        params = policy.params
        self.ties = policy.ties
        self.use_bookings = params.use_bookings
        self.handover_s = params.handover_s
        self.tie_rel = params.tie_rel
        self.tie_rule = params.tie_rule
        self.tbt_s = policy.model.tbt_s
        self.residence_s = policy.model.residence_s
        self._buf = _Buffers(0, self.tbt_s)
        self._bounds: tuple[Any, ...] | None = None
        self.decided = 0  # decisions made here (the rest went to the policy's own decide)
        self.kernel = _kernel if kernel else None

    @staticmethod
    def applies(engine: DecisionEngine) -> bool:
        return type(engine.policy) is Netkv

    def decide(self, candidates: CandidateView, oracle: CostOracle, *, prefill_host: int,
               prompt_tokens: int, output_tokens: int, kv_bytes_per_token: float,
               runs: list[list[int]] | None, prefixes: PrefixIndex,
               block_tokens: int, load_version: int | None = None) -> Decision | None:
        """The engine's decision for a request without a prefill view, streaming or source
        NIC rate (timed into the engine like :meth:`DecisionEngine.decide`), or ``None``
        when these inputs need the general path. ``runs`` are the prompt's held blocks as
        :meth:`PrefixIndex.runs <netkv.routing.prefixes.PrefixIndex.runs>` of ``prefixes``
        gives them (None: nobody holds the first). ``load_version`` changes whenever the
        candidates' ``kv_use`` or ``capacity_tokens`` do (their bounds are kept until then;
        ``None``: recomputed for every decision)."""
        kind = type(oracle)
        if ((kind is not CachedMapView and kind is not CachedOracle)
                or candidates.tbt_s is not None or candidates.waiting_tokens is not None
                or candidates.nic_bytes_s is not None):
            return None
        start = time.perf_counter_ns()
        decision = self._decide(candidates, oracle, prefill_host,  # type: ignore[arg-type]
                                prompt_tokens, output_tokens, kv_bytes_per_token, runs,
                                prefixes, block_tokens, load_version)
        self.engine.record((time.perf_counter_ns() - start) * 1e-9)
        self.decided += 1
        return decision

    def _decide(  # noqa: PLR0917 - positional: called once per decision, from decide only
            self, candidates: CandidateView, oracle: CachedMapView | CachedOracle, src: int,
            prompt_tokens: int, output_tokens: int, kv_bytes_per_token: float,
            runs: list[list[int]] | None, prefixes: PrefixIndex, block_tokens: int,
            load_version: int | None, /) -> Decision:
        n = candidates.host.shape[0]
        b = self._buf
        if b.n != n:
            b = self._buf = _Buffers(n, self.tbt_s)
        if self.kernel is not None:
            decision = self._in_kernel(self.kernel, candidates, oracle, src, prompt_tokens,
                                       output_tokens, kv_bytes_per_token, runs, block_tokens,
                                       load_version, b)
            if decision is not None:
                return decision
        # -- decode_side: bytes the decoder lacks, queue for KV memory, first step --------
        nbytes = self._nbytes(b, n, prompt_tokens, kv_bytes_per_token, runs, prefixes,
                              block_tokens)
        need = float(prompt_tokens + output_tokens)
        capacity = candidates.capacity_tokens
        queue: FloatArray | None = None  # None: +0.0 for every candidate
        used_max, capacity_min, kv_uniform = self._load_bounds(candidates, load_version)
        # The deficit need + waiting * need + used - capacity is +0.0 everywhere when even
        # the largest terms (with a margin far above float64 rounding) stay under the
        # smallest capacity: all terms are non-negative and finite (validated at the edge).
        waiting_max = int(np.maximum.reduce(candidates.waiting))
        if not (waiting_max * need + need + used_max) * (1.0 + 1e-9) < capacity_min:
            used, drain = self._drain(candidates, load_version, block_tokens, b)
            queue = b.queue  # need + waiting * need + used - capacity, floored at 0
            np.multiply(candidates.waiting, need, out=queue)
            np.add(queue, need, out=queue)
            np.add(queue, used, out=queue)
            np.subtract(queue, capacity, out=queue)
            np.maximum(queue, 0.0, out=queue)
            if np.count_nonzero(queue):  # deficit / (max(used, block) / residence)
                if drain is None:
                    drain = b.rate
                    np.maximum(used, float(block_tokens), out=drain)
                    np.divide(drain, self.residence_s, out=drain)
                np.divide(queue, drain, out=queue)
        first = b.first
        # -- transfer: the oracle's row for the candidates, plus the booked transfers -----
        gathered = self._row(oracle, src, candidates)
        latency, bandwidth, tier, links, kept = (gathered.latency, gathered.bandwidth,
                                                 gathered.tier, gathered.links, gathered.kept)
        transfer = b.transfer
        np.divide(nbytes, bandwidth, out=transfer)
        np.add(latency, transfer, out=transfer)
        bookings = self.bookings
        if self.use_bookings and bookings.active:
            flows, competing = b.flows, b.competing
            if flows.shape != links.shape:  # path tables are (6, hosts); kept general
                flows = b.flows = np.empty(links.shape)
                competing = b.competing = np.empty(links.shape)
            # ndarray.take (the function adds ~1 µs of dispatch); "wrap" leaves the (valid)
            # indices as they are and writes into ``out`` without an intermediate buffer
            bookings.flows_ext.take(links, out=flows, mode="wrap")
            np.multiply(flows, nbytes, out=flows)
            bookings.bytes_ext.take(links, out=competing, mode="wrap")
            np.minimum(competing, flows, out=competing)
            np.divide(competing, kept, out=competing)
            np.maximum.reduce(competing, axis=0, out=b.extra)
            np.add(transfer, b.extra, out=transfer)
        if self.handover_s > 0:
            np.add(transfer, np.where(nbytes > 0, self.handover_s, 0.0), out=transfer)
        # -- the choice ---------------------------------------------------------------------
        # (queue + transfer) + first; without a queue 0.0 + transfer is transfer exactly
        scores: FloatArray = transfer + first if queue is None else queue + transfer
        if queue is not None:
            np.add(scores, first, out=scores)
        mask, other = b.mask, b.other  # scratch: the draw and the near set, no allocation
        chosen = self.ties.argmin(scores, scratch=mask)
        if self.tie_rel > 0 and self.tie_rule == "load":
            near = near_ties(scores, transfer, tier, chosen, self.tie_rel, out=(mask, other))
            if near is not None:
                chosen = self._less_loaded(near, candidates.kv_use, uniform_kv=kv_uniform)
        elif self.tie_rel > 0:
            chosen = prefer_lower_tier(scores, transfer, tier, chosen, tie_rel=self.tie_rel,
                                       ties=self.ties)
        q = 0.0 if queue is None else float(queue.item(chosen))
        t = float(transfer.item(chosen))
        f = float(first.item(chosen))
        return Decision(index=chosen, ttft_s=q + t + f, queue_s=q, transfer_s=t,
                        first_token_s=f, tier=int(tier.item(chosen)),
                        transfer_bytes=float(nbytes.item(chosen)), scores=scores)

    def _in_kernel(  # noqa: PLR0917 - positional: called once per decision, from _decide
            self, kernel: ModuleType, candidates: CandidateView,
            oracle: CachedMapView | CachedOracle, src: int, prompt_tokens: int,
            output_tokens: int, kv_bytes_per_token: float, runs: list[list[int]] | None,
            block_tokens: int, load_version: int | None, b: _Buffers, /) -> Decision | None:
        """:meth:`_decide` after the cached gathers, in :mod:`netkv.routing._kernel` (None:
        a path link outside the booked-link arrays, which only the numpy path takes)."""
        used_max, capacity_min, kv_uniform, used, drain = self._kernel_loads(
            candidates, load_version, block_tokens, b)
        gathered = self._row(oracle, src, candidates)
        latency, bandwidth, tier, links, waiting, kv_use, capacity = gathered.views
        bookings = self.bookings
        booked = self.use_bookings and bookings.active
        scores: FloatArray = np.empty(b.n)
        rng = self.ties.rng
        nbytes, queue, transfer = b.outputs
        got = kernel.decide(
            runs, prompt_tokens, kv_bytes_per_token, block_tokens,
            float(prompt_tokens + output_tokens), used_max, capacity_min, waiting, used,
            kv_use, capacity, drain, self.residence_s, latency, bandwidth,
            links if booked else None, gathered.kept_view, bookings.flows_items,
            bookings.bytes_items, self.handover_s, self.tbt_s, tier, self.tie_rel,
            self.tie_rule == "load", kv_uniform, rng.integers,
            rng.bit_generator.capsule if DRAWS_IN_C else None, nbytes, queue, transfer,
            scores)
        if got is None:
            return None
        chosen, q, t, nbytes, tier_of = got  # the chosen one's values, read in C
        f = float(self.tbt_s)
        return Decision(index=chosen, ttft_s=q + t + f, queue_s=q, transfer_s=t,
                        first_token_s=f, tier=tier_of, transfer_bytes=nbytes, scores=scores)

    @staticmethod
    def _nbytes(  # noqa: PLR0917 - positional: called once per decision, from _decide only
            b: _Buffers, n: int, prompt_tokens: int, kv_bytes_per_token: float,
            runs: list[list[int]] | None, prefixes: PrefixIndex, block_tokens: int, /
            ) -> FloatArray:
        """The bytes each candidate lacks: max(prompt - overlap * block, 0) *
        kv_bytes_per_token, an exact integer, then one float64 product, per distinct overlap
        (one per run of held blocks; Python's int and float arithmetic is numpy's int64 and
        float64 here: |values| < 2**53)."""
        whole = prompt_tokens * kv_bytes_per_token
        nbytes: FloatArray
        if runs is None:
            nbytes = b.nbytes
            nbytes.fill(whole)
            return nbytes
        low = (1 << n) - 1
        held = runs[0][1]
        value = max(prompt_tokens - held * block_tokens, 0) * kv_bytes_per_token
        if (runs[0][0] & low) == low:  # every decoder holds it (a shared system prompt)
            nbytes = b.nbytes
            nbytes.fill(value)
        else:  # a recurring set: cached
            nbytes = np.where(prefixes.bits(runs[0][0], n), value, whole)
        for holders_of_run, count in runs[1:]:  # subsets of the run before
            held += count
            value = max(prompt_tokens - held * block_tokens, 0) * kv_bytes_per_token
            rest = holders_of_run & low
            if rest.bit_count() > 8:
                np.putmask(nbytes, prefixes.flags(rest, n), value)
                continue
            while rest:
                bit = rest & -rest
                nbytes[bit.bit_length() - 1] = value
                rest ^= bit
        return nbytes

    def _less_loaded(self, near: BoolArray, kv_use: FloatArray, uniform_kv: bool) -> int:
        """:func:`~netkv.core.policies.network.prefer_less_loaded` once
        :func:`~netkv.core.policies.network.near_ties` found ``near``; when every candidate
        has the same KV use, its masked argmin ties exactly the near candidates, so the draw
        among them is made directly (the same single draw from the same generator)."""
        if not uniform_kv:
            masked: FloatArray = np.where(near, kv_use, np.inf)
            return self.ties.argmin(masked)
        ties = near.nonzero()[0]  # flatnonzero of a 1-D array, without its two wrappers
        return int(ties[self.ties.rng.integers(ties.shape[0])])

    def _kernel_loads(self, candidates: CandidateView, load_version: int | None,
                      block_tokens: int, b: _Buffers
                      ) -> tuple[float, float, bool, _Buffer | None, _Buffer | None]:
        """What the kernel reads of the loads: :meth:`_load_bounds`, ``used`` and the drain
        rate of :meth:`_drain` (None: not kept, computed in the kernel), in one check of
        the kept version while it holds (then as memoryviews of the kept arrays)."""
        kept = self._bounds
        if (load_version is not None and kept is not None and kept[0] == load_version
                and kept[1] is candidates.kv_use and kept[2] is candidates.capacity_tokens
                and kept[7] is not None and kept[7][0] == block_tokens):
            return kept[3], kept[4], kept[5], kept[8], kept[7][2]  # (as memoryviews)
        used_max, capacity_min, kv_uniform = self._load_bounds(candidates, load_version)
        drain = None if load_version is None else \
            self._drain(candidates, load_version, block_tokens, b)[1]
        used = None if self._bounds is None else self._bounds[6]
        return used_max, capacity_min, kv_uniform, used, drain

    def _load_bounds(self, candidates: CandidateView, load_version: int | None
                     ) -> tuple[float, float, bool]:
        """``(max(kv_use * capacity), min(capacity), all kv_use equal)``, kept while
        ``load_version`` and the arrays stay the same (recomputed on every call without a
        version); the product itself is kept beside them for :meth:`_drain`."""
        kv_use, capacity = candidates.kv_use, candidates.capacity_tokens
        kept = self._bounds
        if (load_version is None or kept is None or kept[0] != load_version
                or kept[1] is not kv_use or kept[2] is not capacity):
            used = np.multiply(kv_use, capacity)
            used.flags.writeable = False
            kept = (load_version, kv_use, capacity, float(np.maximum.reduce(used)),
                    float(np.minimum.reduce(capacity)),
                    bool(np.minimum.reduce(kv_use) == np.maximum.reduce(kv_use)), used, None,
                    used.data)
            self._bounds = kept
        return kept[3], kept[4], kept[5]

    def _drain(self, candidates: CandidateView, load_version: int | None, block_tokens: int,
               b: _Buffers) -> tuple[FloatArray, FloatArray | None]:
        """``(used, max(used, block) / residence)`` with ``used = kv_use * capacity``: the
        ones :meth:`_load_bounds` kept for this version (the rate made on first use, then
        kept too), else computed into ``b`` (the rate is then left to the caller: None)."""
        kept = self._bounds
        if (load_version is None or kept is None or kept[0] != load_version
                or kept[1] is not candidates.kv_use
                or kept[2] is not candidates.capacity_tokens):
            return np.multiply(candidates.kv_use, candidates.capacity_tokens, out=b.used), None
        rate = kept[7]
        if rate is None or rate[0] != block_tokens:
            value = np.maximum(kept[6], float(block_tokens))
            np.divide(value, self.residence_s, out=value)
            value.flags.writeable = False
            rate = (block_tokens, value, value.data)
            self._bounds = (*kept[:7], rate, kept[8])
        return kept[6], rate[1]

    def _row(self, oracle: CachedMapView | CachedOracle, src: int, candidates: CandidateView
             ) -> _Row:
        """The oracle's zero-byte row from ``src`` for the candidates (latency, bandwidth,
        tier), the candidates' path links in the bookings' table and ``max(rate[links], 1)``
        for the oracle's per-link rates: gathered once per row, rate array and view."""
        row, rate = oracle.row_and_rate(src)
        key = (_ROWS, src)
        cache = candidates.cache
        hit: _Row | None = cache.get(key)
        if hit is None or hit.row is not row:
            host = candidates.host
            links = np.take(self.bookings.paths.from_src(src).links, host, axis=1)
            hit = _Row(row, candidates, links)
            if key not in cache and len(cache) >= max(8, 65536 // max(host.shape[0], 1)):
                cache.clear()
            cache[key] = hit
        if hit.rate is not rate:  # a new per-link view (the map view was refreshed)
            hit.rate, hit.kept = rate, np.maximum(rate[hit.links], 1.0)
            hit.kept_view = hit.kept.data
        return hit


class _Row:
    """One source's gathered row for one candidate view (see :meth:`FusedNetkv._row`), with
    memoryviews of the arrays the kernel reads (exporting a memoryview's buffer costs a
    tenth of an ndarray's)."""

    __slots__ = ("bandwidth", "kept", "kept_view", "latency", "links", "rate", "row", "tier",
                 "views")

    def __init__(self, row: CostEstimate, candidates: CandidateView, links: IntArray) -> None:
        host = candidates.host
        self.row, self.links = row, links
        self.latency: FloatArray = row.latency_s[host]
        self.bandwidth: FloatArray = row.bandwidth_bytes_s[host]
        self.tier: IntArray = row.tier[host]
        self.rate: FloatArray | None = None
        self.kept: FloatArray = self.latency  # (set with the rate, before any use)
        self.kept_view = self.kept.data
        # the candidates' arrays too: a view's arrays are fixed (a new one is made instead)
        self.views = tuple(a.data for a in (
            self.latency, self.bandwidth, self.tier, links, candidates.waiting,
            candidates.kv_use, candidates.capacity_tokens))
