"""One simulated run: the event loop and one method per stage of a request's life.

:class:`Run` holds the run's state (event queue, fabric, telemetry view, instance pools and
per-request arrays) and dispatches each event to its stage: ``arrival`` (choose a prefill
instance), ``prefill_done`` (choose a decoder), ``admit`` (start the transfer), the fabric's
``flow`` completions (``join`` the batch), ``decode`` completions, and ``background``
changes. See :mod:`netkv.sim.simulation` for the models and the request life cycle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from netkv.core.policies import Booking, DecisionEngine, PrefillView, make_policy
from netkv.sim.events import EventQueue, Kind
from netkv.sim.fabric import Fabric, hot_spots
from netkv.sim.pools import DecodePool, PrefillPool
from netkv.sim.runconfig import RunConfig, RunResult
from netkv.sim.telemetry import BackgroundHistory, TelemetryView
from netkv.workload.trace import BLOCK_TOKENS

if TYPE_CHECKING:
    from netkv.sim.simulation import Simulation

PROGRESS_EVERY = 256


class Run:
    """The mutable state of one run of one policy; :meth:`execute` runs it to the end."""

    def __init__(self, sim: Simulation, config: RunConfig,
                 progress: Callable[[int], object] | None = None) -> None:
        self.sim = sim
        self.config = config
        self.progress = progress
        spec = sim.scenario.spec
        self.spec = spec
        self.topo = sim.topology
        self.trace = trace = sim.trace
        n = len(trace)
        params = dict(spec.policies.get(config.policy, {}))
        params.update(config.params)
        self.engine = DecisionEngine(make_policy(config.policy, params), self.topo,
                                     history=max(2 * n, 16))
        self.joint = config.policy == "netkv_pair"
        self.fabric = Fabric(self.topo)
        self.history = BackgroundHistory(self.topo.n_links)
        self.view = TelemetryView(self.topo, self.history, config.telemetry(spec.telemetry),
                                  spec.seed, ground_truth=config.oracle == "truth")
        horizon = float(trace.arrival_s[-1]) + 3600.0
        self.spots = hot_spots(self.topo, spec.background, horizon, spec.seed,
                               config.congestion)
        self.events = EventQueue()
        for i, s in enumerate(self.spots):
            self.events.push(s.start_s, Kind.BACKGROUND, i, 1)
            self.events.push(s.end_s, Kind.BACKGROUND, i, -1)
        for r in range(n):
            self.events.push(float(trace.arrival_s[r]), Kind.ARRIVAL, r)

        # Per-request state.
        self.prefill_of = np.full(n, -1, np.int64)
        self.decode_of = np.full(n, -1, np.int64)
        self.need = (trace.input_tokens + trace.output_tokens).astype(np.float64)
        self.ctx = (trace.input_tokens + trace.output_tokens / 2.0).astype(np.float64)
        self.hits = np.zeros(n, np.int64)
        self.kv_bytes = np.zeros(n)
        self.tier = np.full(n, -1, np.int64)
        self.t_ready = np.zeros(n)
        self.t_admit = np.zeros(n)
        self.t_join = np.zeros(n)
        self.ttft = np.full(n, np.nan)
        self.tbt = np.full(n, np.nan)
        self.completions = np.zeros(n, np.int64)
        self.predicted = np.full(n, np.nan)
        self.bookings: dict[int, Booking] = {}
        self.requested = 0.0
        self.finished = 0
        self.reported = 0

        self.prefills = PrefillPool(sim.prefill_host, sim.prefill_cache_blocks, n)
        cache_blocks = [int(c * spec.decode.prefix_cache_fraction / BLOCK_TOKENS)
                        for c in sim.decode_capacity]
        step_s = np.array([sim.step_time(d, 0.0) for d in range(len(sim.decode_host))])
        self.decodes = DecodePool(sim.decode_host, sim.decode_capacity, cache_blocks, step_s)

    # -- the loop ---------------------------------------------------------------------------
    def execute(self) -> RunResult:
        wall = time.perf_counter()
        handlers = {Kind.ARRIVAL: self.arrival, Kind.PREFILL_DONE: self.prefill_done,
                    Kind.FLOW: self.flow, Kind.DECODE: self.decode,
                    Kind.BACKGROUND: self.background}
        table = [handlers[Kind(k)] for k in range(len(handlers))]
        events = self.events
        while events:
            now, kind, a, b = events.pop()
            table[kind](now, a, b)
        if self.progress is not None:
            self.progress(self.finished - self.reported)
        self.fabric.advance(self.fabric.now)
        trace = self.trace
        return RunResult(
            name=self.config.name, ttft_s=self.ttft, tbt_s=self.tbt,
            slo_ttft_s=self.sim.slo_ttft, transfer_s=self.t_join - self.t_admit,
            queue_s=self.t_admit - self.t_ready, prefill_s=self.t_ready - trace.arrival_s,
            kv_bytes=self.kv_bytes, tier=self.tier, completions=self.completions,
            decision_s=self.engine.recorded().copy(), predicted_ttft_s=self.predicted,
            requested_bytes=self.requested, delivered_bytes=self.fabric.delivered_bytes,
            wall_s=time.perf_counter() - wall)

    # -- stage 1: arrival, prefill choice -------------------------------------------------
    def arrival(self, now: float, r: int, _: int) -> None:
        sim, trace, pool = self.sim, self.trace, self.prefills
        tokens = int(trace.input_tokens[r])
        hit_p = np.array([c.match(trace.hash_ids[r]) for c in pool.caches], np.int64)
        compute = np.array([sim.prefill_time(p, tokens, int(hit_p[p]))
                            for p in range(len(pool))])
        ready = pool.wait(now) + compute
        p = int(np.argmin(ready))
        if self.joint:
            self.fabric.advance(now)
            oracle = self.view.refresh(now, self.fabric.background)
            req = sim.request_view(r, self.decodes.decoders, PrefillView(pool.host, ready))
            decision = self.engine.decide(req, self.decodes.view(), oracle)
            p = int(decision.prefill_index if decision.prefill_index is not None else p)
        self.prefill_of[r] = p
        pool.enqueue(p, r, float(compute[p]))
        self.start_prefill(p, now)

    def start_prefill(self, p: int, now: float) -> None:
        pool = self.prefills
        r = pool.next_to_start(p)
        if r < 0:
            return
        hit = pool.caches[p].match(self.trace.hash_ids[r])
        self.hits[r] = hit
        done = now + self.sim.prefill_time(p, int(self.trace.input_tokens[r]), hit)
        pool.busy_until[p] = done
        pool.active[p] = r
        self.events.push(done, Kind.PREFILL_DONE, p, r)

    # -- stage 2: prefill done, decode choice ---------------------------------------------
    def prefill_done(self, now: float, p: int, r: int) -> None:
        pool = self.prefills
        pool.caches[p].insert(self.trace.hash_ids[r])
        pool.active[p] = -1
        self.start_prefill(p, now)
        self.t_ready[r] = now
        self.fabric.advance(now)
        oracle = self.view.refresh(now, self.fabric.background)
        req = self.sim.request_view(r, self.decodes.decoders, None,
                                    src=int(pool.host[p]))
        decision = self.engine.decide(req, self.decodes.view(), oracle)
        d = decision.index
        self.predicted[r] = decision.ttft_s
        self.decode_of[r] = d
        self.decodes.enqueue(d, r, float(self.need[r]))
        self.admit(d, now)

    # -- stage 3: admission at the decoder, transfer start ---------------------------------
    def admit(self, d: int, now: float) -> None:
        pool = self.decodes
        dec = pool.decoders[d]
        changed = False
        while True:
            r = pool.admit_next(d, self.need)
            if r < 0:
                break
            self.t_admit[r] = now
            src, dst = int(self.prefills.host[self.prefill_of[r]]), dec.host
            overlap = dec.cache.match(self.trace.hash_ids[r])
            tokens = int(self.trace.input_tokens[r])
            nbytes = (tokens - min(overlap * BLOCK_TOKENS, tokens)) * self.sim.bpt
            self.kv_bytes[r] = nbytes
            self.tier[r] = int(self.topo.tier(src, dst))
            if nbytes <= 0:
                self.join(r, d, now)
                continue
            self.requested += nbytes
            self.bookings[r] = self.engine.reserve(src, dst, nbytes)
            self.fabric.add(r, self.topo.path(src, dst), nbytes)
            changed = True
        if changed:
            self.reallocate()

    def reallocate(self) -> None:
        nxt = self.fabric.reallocate()
        if nxt < float("inf"):
            self.events.push(nxt, Kind.FLOW, self.fabric.version)

    # -- stage 4: transfer done, join the batch ---------------------------------------------
    def flow(self, now: float, version: int, _: int) -> None:
        fabric = self.fabric
        if version != fabric.version:
            return
        fabric.advance(now)
        for f in fabric.finished():
            r = f.request
            self.engine.release(self.bookings.pop(r))
            self.join(r, int(self.decode_of[r]), now)
        self.reallocate()

    def join(self, r: int, d: int, now: float) -> None:
        dec = self.decodes.decoders[d]
        dec.advance(now)
        dec.batch[r] = float(self.trace.output_tokens[r])
        dec.ctx += self.ctx[r]
        dec.cache.insert(self.trace.hash_ids[r])
        self.t_join[r] = now
        self.reschedule_decoder(d, now)
        self.ttft[r] = now + dec.step_s - self.trace.arrival_s[r]

    # -- stage 5: decoding ------------------------------------------------------------------
    def reschedule_decoder(self, d: int, now: float) -> None:
        dec = self.decodes.decoders[d]
        dec.step_s = self.sim.step_time(d, dec.ctx)
        self.decodes.step_s[d] = dec.step_s
        dec.version += 1
        if dec.batch:
            left = min(dec.batch.values())
            self.events.push(now + max(left, 0.0) * dec.step_s, Kind.DECODE, d, dec.version)

    def decode(self, now: float, d: int, version: int) -> None:
        dec = self.decodes.decoders[d]
        if version != dec.version:
            return
        dec.advance(now)
        done = [r for r, left in dec.batch.items() if left <= 1e-6]
        for r in done:
            self.decodes.finish(d, r, float(self.need[r]), float(self.ctx[r]))
            self.completions[r] += 1
            self.tbt[r] = (now - self.t_join[r]) / float(self.trace.output_tokens[r])
            self.finished += 1
        if not dec.batch:
            dec.ctx = 0.0
        self.reschedule_decoder(d, now)
        self.admit(d, now)
        if self.progress is not None and self.finished - self.reported >= PROGRESS_EVERY:
            self.progress(self.finished - self.reported)
            self.reported = self.finished

    # -- background -------------------------------------------------------------------------
    def background(self, now: float, i: int, sign: int) -> None:
        s = self.spots[i]
        fabric = self.fabric
        fabric.advance(now)
        fabric.set_background(s.link, sign * s.load)
        self.history.record(now, fabric.background)
        if fabric.flows:
            self.reallocate()
