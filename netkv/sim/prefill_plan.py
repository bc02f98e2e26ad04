"""The prefill side of a run, computed once per simulation and replayed by every run.

Unless the policy chooses prefill and decode jointly (``netkv_pair``), everything on the
prefill side is independent of the decode policy and of the run's seed: the prefill
instance a request goes to (cache+load-aware, from the prefill queues and the prefill
instances' prefix caches), when it starts and for how long it computes (its prefix hit then),
and which blocks it fetches from which host of the KV store (the hosts that computed them
first). Only ARRIVAL and PREFILL_DONE events change that state, and they run in the same
relative order in every run (the event queue orders equal times by push order, and these
events are pushed only by each other).

So :func:`prefill_plan` runs that part alone, once (a fraction of a run's cost), and
:class:`netkv.sim.stages.Run` replays it: it pushes the very same events and keeps the
queues, but takes the choices, hits and compute times from the plan instead of matching
every request against every prefill cache, pricing it on every instance and keeping the KV
store's index, again for every policy and seed. The numbers are the same bit for bit
(``tests/unit/test_sim_golden.py`` pins them; ``tests/unit/test_prefill_plan.py`` checks the
plan against a run that does the work itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from netkv.core.topology import FloatArray, IntArray
from netkv.sim.events import EventQueue, Kind
from netkv.sim.pools import PrefillPool

if TYPE_CHECKING:
    from netkv.sim.simulation import Simulation


@dataclass(frozen=True)
class PrefillPlan:
    """Per request: the prefill instance (``prefill``), the compute estimate it was queued
    with (``estimate_s``), its prefix hit in blocks and compute seconds when it starts
    (``hit_blocks``, ``compute_s``), and the KV-store fetches then: ``(source host, blocks)``
    pairs in the order the run adds them (``fetches``; empty when fetches are off)."""

    prefill: IntArray
    estimate_s: FloatArray
    hit_blocks: IntArray
    compute_s: FloatArray
    fetches: tuple[tuple[tuple[int, int], ...], ...]


def prefill_plan(sim: Simulation, *, fetch: bool) -> PrefillPlan:
    """Run the prefill side of ``sim`` alone (``fetch``: record KV-store fetches)."""
    trace = sim.trace
    n = len(trace)
    pool = PrefillPool(sim.prefill_host, sim.prefill_cache_blocks, n)
    events = EventQueue()
    for r in range(n):
        events.push(float(trace.arrival_s[r]), Kind.ARRIVAL, r)
    prefill = np.full(n, -1, np.int64)
    estimate = np.zeros(n)
    hits = np.zeros(n, np.int64)
    compute_s = np.zeros(n)
    fetches: list[tuple[tuple[int, int], ...]] = [()] * n
    store: dict[int, int] = {}  # block hash -> host that first computed it

    def start(p: int, now: float) -> None:
        r = pool.next_to_start(p)
        if r < 0:
            return
        hashes = trace.hash_ids[r]
        hit = pool.caches[p].match(hashes)
        hits[r] = hit
        compute = sim.prefill_time(p, int(trace.input_tokens[r]), hit)
        compute_s[r] = compute
        pool.busy_until[p] = now + compute
        pool.active[p] = r
        events.push(now + compute, Kind.PREFILL_DONE, p, r)
        if fetch:
            dst = int(pool.host[p])
            by_host: dict[int, int] = {}
            for h in hashes[hit:]:
                src = store.get(h)
                if src is not None and src != dst:
                    by_host[src] = by_host.get(src, 0) + 1
            fetches[r] = tuple(by_host.items())

    while events:
        now, kind, a, b = events.pop()
        if kind == Kind.ARRIVAL:
            r = a
            tokens = int(trace.input_tokens[r])
            hit_p = np.array([c.match(trace.hash_ids[r]) for c in pool.caches], np.int64)
            compute = sim.prefill_times(tokens, hit_p)
            ready = pool.wait(now) + compute
            p = int(np.argmin(ready))
            prefill[r] = p
            estimate[r] = float(compute[p])
            pool.enqueue(p, r, float(compute[p]))
            start(p, now)
        else:  # PREFILL_DONE
            p, r = a, b
            hashes = trace.hash_ids[r]
            pool.caches[p].insert(hashes)
            host = int(pool.host[p])
            for h in hashes:
                store.setdefault(h, host)
            pool.active[p] = -1
            start(p, now)
    return PrefillPlan(prefill, estimate, hits, compute_s, tuple(fetches))
