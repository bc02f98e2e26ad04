"""Where a request goes: the prefill, then the decode chosen knowing the prefill's host.

This is NetKV's decision core in process: the same policies (:mod:`netkv.core.policies`),
the same live congestion map (:class:`netkv.routing.mapfeed.MapFeed`) and the same prefix
index (:class:`netkv.routing.prefixes.PrefixIndex`) as the scheduler service, with no HTTP
hop. What differs is what the proxy knows first-hand: the workers' health, their vLLM load
gauges, the requests it has in flight, and which prompt blocks it has itself sent to each
decoder (the delta-transfer term).

Every placement books its transfer on the links of its path (:class:`Bookings`) and hands it
back when the decode answers, i.e. once the KV is in (:meth:`Placement.transferred`), or when
the request ends or fails (:meth:`Placement.release`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from netkv.core.costmodel import CostOracle, static_tier_oracle
from netkv.core.paths import CachedOracle
from netkv.core.policies import Booking, Bookings, CandidateView, Decision, PrefillView, RequestView
from netkv.core.topology import Tier, Topology
from netkv.routing.candidates import CandidateViews, decision_engine
from netkv.routing.fused import FusedNetkv
from netkv.routing.mapfeed import MapFeed
from netkv.routing.prefixes import PrefixIndex
from netkv_proxy.workers import Worker, WorkerPool

MapSource = Literal["map", "prior"]
_TIER_NAMES = {int(t): t.name.lower() for t in Tier}
_LOOP_FILL_MAX = 32  # decodes up to which the candidate view is filled element by element


@dataclass(frozen=True, slots=True)
class MapState:
    oracle: CostOracle
    source: MapSource
    version: int | None
    age_s: float | None
    reason: str  # why the priors are used ("" when the map is)


@dataclass(slots=True)
class Placed:
    """One placement and what the answer and the metrics report about it."""

    prefill: Worker
    decode: Worker
    decision: Decision
    policy: str
    map: MapState
    booking: Booking | None
    decide_s: float
    released: bool = False

    @property
    def tier(self) -> str:
        return _TIER_NAMES[int(self.decision.tier)]


class Placement:
    """Decisions, bookings and the prefix index of one proxy."""

    def __init__(self, topology: Topology, pool: WorkerPool, *, feed: MapFeed | None,
                 policy: str, policy_params: dict[str, dict[str, object]],
                 bytes_per_token: float, capacity_tokens: float, block_tokens: int,
                 prefix_blocks: int, fused: bool = True) -> None:
        """``fused`` (default) decides ``netkv`` with :class:`~netkv.routing.fused.FusedNetkv`
        where it applies (pull flow, every decode admitted): the same decisions, cheaper."""
        self.topology, self.pool, self.feed = topology, pool, feed
        self.prior = CachedOracle(static_tier_oracle(topology))
        self._no_map = MapState(self.prior, "prior", None, None, "no congestion map configured")
        self.bookings = Bookings(topology)
        self.policy = policy
        self.engine = decision_engine(policy, policy_params.get(policy), topology,
                                      self.bookings, setting="proxy.policy")
        self.fused = FusedNetkv(self.engine) if fused and FusedNetkv.applies(self.engine) \
            else None
        self.bytes_per_token = bytes_per_token
        self.capacity_tokens = capacity_tokens
        self.block_tokens = block_tokens
        self.prefix = PrefixIndex(prefix_blocks)
        self.open: set[int] = set()  # ids of Placed not yet released
        n = len(pool.decodes)
        self._hosts = np.array([w.host_index for w in pool.decodes], dtype=np.int64)
        self._capacity = np.full(n, capacity_tokens)
        # With every decode admitted (the common case) one view is kept across decisions,
        # its load arrays refilled in place, so the policies' per-view caches live on.
        self._views = CandidateViews()
        self._running = np.zeros(n, dtype=np.int64)
        self._waiting = np.zeros(n, dtype=np.int64)
        self._extra = np.zeros(n, dtype=np.int64)
        self._kv_use = np.zeros(n)
        # Changes whenever the kept view's kv_use does (capacity is fixed): the fused
        # evaluation keeps its load bounds until then, as the scheduler's registry has it
        self._load_version = 0

    # -- the map ----------------------------------------------------------------------------
    def map_state(self) -> MapState:
        if self.feed is None:
            return self._no_map
        view = self.feed.view()
        if view.stale:
            reason = "no congestion map yet" if view.version is None else \
                f"congestion map is stale ({view.age_s:.1f} s old)"
            return MapState(view.oracle, "prior", view.version, view.age_s, reason)
        return MapState(view.oracle, "map", view.version, view.age_s, "")

    # -- decisions --------------------------------------------------------------------------
    def _candidates(self, decodes: list[Worker]) -> CandidateView:
        """The view over ``decodes``; requests the proxy has in flight beyond what the last
        scrape saw count as waiting."""
        n = len(decodes)
        if n == len(self.pool.decodes) and n <= _LOOP_FILL_MAX:
            # Every decode admitted and a few of them: the kept view's arrays filled element
            # by element (a dozen whole-array numpy calls cost ~1 us each on arrays this
            # small). The same numbers as the numpy path below: float64 arithmetic, then
            # truncation towards zero (the gauges are finite and >= 0, see routing.scrape).
            run_a, wait_a, extra_a, kv_a = self._running, self._waiting, self._extra, \
                self._kv_use
            changed = False
            for i, w in enumerate(decodes):
                run, wait = w.running, w.waiting
                waits = int(wait)
                run_a[i] = int(run)
                wait_a[i] = waits
                extra_a[i] = int(wait + max(w.inflight - run - wait, 0.0)) - waits
                if kv_a[i] != w.kv_use:
                    kv_a[i] = w.kv_use
                    changed = True
            if changed:
                self._load_version += 1
            return self._views.get(self._hosts, run_a, wait_a, kv_a, self._capacity,
                                   extra_waiting=extra_a)
        load = np.fromiter((x for w in decodes for x in (w.running, w.waiting, w.inflight,
                                                         w.kv_use)), np.float64, 4 * n)
        load = load.reshape(n, 4)
        running, waiting = load[:, 0], load[:, 1]
        total = waiting + np.maximum(load[:, 2] - running - waiting, 0.0)
        if n != len(self.pool.decodes):  # some are ejected: a view of the admitted ones
            host = np.fromiter((w.host_index for w in decodes), np.int64, n)
            return CandidateView(host=host, running=running.astype(np.int64),
                                 waiting=total.astype(np.int64), kv_use=load[:, 3],
                                 capacity_tokens=self._capacity[:n])
        np.copyto(self._running, running, casting="unsafe")
        np.copyto(self._waiting, waiting, casting="unsafe")
        np.copyto(self._extra, total, casting="unsafe")  # waiting + extra, truncated once
        np.subtract(self._extra, self._waiting, out=self._extra)
        if not np.array_equal(self._kv_use, load[:, 3]):
            self._kv_use[:] = load[:, 3]
            self._load_version += 1
        return self._views.get(self._hosts, self._running, self._waiting, self._kv_use,
                               self._capacity, extra_waiting=self._extra)

    def _overlap(self, hashes: list[int], decodes: list[Worker]
                 ) -> np.ndarray[tuple[int], np.dtype[np.int64]] | None:
        if not hashes:
            return None
        full = self.prefix.overlap(hashes, len(self.pool.decodes))
        if full is None or len(decodes) == len(full):  # all admitted, in index order
            return full
        return full[[w.index for w in decodes]]

    def place(self, prefill: Worker | None, prompt_tokens: int, hashes: list[int],
              output_tokens: int) -> Placed | None:
        """Choose the decode (and, without ``prefill``, the pair: ``netkv_pair``)."""
        start = time.perf_counter()
        decodes = self.pool.healthy("decode")
        if not decodes:
            return None
        joint = None
        prefills: list[Worker] = []
        if prefill is None:
            prefills = self.pool.healthy("prefill")
            if not prefills:
                return None
            # ready_s: the queue ahead times the prefill time the proxy has measured there
            joint = PrefillView(host=np.array([w.host_index for w in prefills], dtype=np.int64),
                                ready_s=np.array([w.queue * w.prefill_ewma_s
                                                  for w in prefills]))
            src = prefills[0]
        else:
            src = prefill
        state = self.map_state()
        candidates = self._candidates(decodes)
        decision = None
        if self.fused is not None and joint is None and len(decodes) == len(self.pool.decodes):
            # every decode admitted: candidate i is decode i, as the prefix index counts them
            decision = self.fused.decide(
                candidates, state.oracle, prefill_host=src.host_index,
                prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                kv_bytes_per_token=self.bytes_per_token,
                runs=self.prefix.runs(hashes) if hashes else None, prefixes=self.prefix,
                block_tokens=self.block_tokens, load_version=self._load_version)
        if decision is None:
            request = RequestView(prefill_host=src.host_index, prompt_tokens=prompt_tokens,
                                  kv_bytes_per_token=self.bytes_per_token,
                                  overlap_blocks=self._overlap(hashes, decodes),
                                  block_tokens=self.block_tokens, output_tokens=output_tokens,
                                  prefill=joint)
            decision = self.engine.decide(request, candidates, state.oracle)
        decode = decodes[decision.index]
        if decision.prefill_index is not None and prefills:
            src = prefills[decision.prefill_index]
        booking = self.bookings.reserve(src.host_index, decode.host_index,
                                        decision.transfer_bytes)
        if hashes:
            self.prefix.add(hashes, decode.index)
        decode.inflight += 1
        placed = Placed(src, decode, decision, self.policy, state, booking,
                        time.perf_counter() - start)
        self.open.add(id(placed))
        return placed

    def transferred(self, placed: Placed) -> None:
        """The decode has the KV (it answered, and an engine answers only once its KV is
        in): hand back the transfer's booking now, not when the stream ends. A booking
        stands for bytes on the links; held for the whole decode it made every decoder
        with long streams look as if its NIC were busy (idempotent)."""
        if placed.booking is not None:
            self.bookings.release(placed.booking)
            placed.booking = None

    def release(self, placed: Placed) -> None:
        """Hand back the booking and the in-flight count (idempotent)."""
        if placed.released:
            return
        placed.released = True
        if placed.booking is not None:
            self.bookings.release(placed.booking)
            placed.booking = None
        placed.decode.inflight -= 1
        self.open.discard(id(placed))
