"""The discrete-event loop: arrivals, prefill, KV transfer, decode admission and decoding.

A request's life (every policy sees the same prefill choice and the same models):

1. **Arrival**: a prefill instance is chosen cache+load-aware, as Mooncake's conductor does:
   ``argmin_p wait(p) + prefill_time(prompt - prefix hit at p)`` (``netkv_pair`` instead
   chooses prefill and decode jointly here).
2. **Prefill** (FIFO per instance): compute time from FLOPs,
   ``2 * params * new + 4 * layers * hidden * new * (cached + new / 2)`` over
   ``gpus * peak * mfu``, plus a fixed overhead; the instance's LRU prefix cache (512-token
   blocks, capacity from the GPU memory left after the weights) gives the hit.
3. **Decode choice**: when the KV is ready the policy under test picks a decoder, seeing the
   decoders' load as a router does and the network only through the telemetry view.
4. **Admission**: the decoder admits in FIFO order once it has KV memory for prompt plus
   output; then the **transfer** starts: the bytes of the prompt blocks the decoder lacks
   (its own LRU of resident prefixes) flow over the path, max-min fair with other transfers
   and background hot spots.
5. **Decode**: the request joins the batch; a step reads the weights and the batch's KV
   (``(weights + context_tokens * bytes_per_token) / (gpus * hbm * mbu)`` plus overhead), so
   the time between tokens grows with the batch. TTFT is arrival to the end of the first
   decode step.

Decode progress is tracked as processor sharing: every running request advances one token
per step, so events are only joins and completions, never individual steps.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from netkv.core.policies import (
    Booking,
    CandidateView,
    DecisionEngine,
    PrefillView,
    RequestView,
    make_policy,
)
from netkv.core.prefix_cache import PrefixCache
from netkv.core.topology import FloatArray, IntArray
from netkv.sim.fabric import Fabric, hot_spots
from netkv.sim.scenario import Scenario
from netkv.sim.telemetry import BackgroundHistory, TelemetryView
from netkv.workload.trace import BLOCK_TOKENS, Trace

OracleKind = Literal["telemetry", "truth"]
ARRIVAL, PREFILL_DONE, FLOW, DECODE, BACKGROUND = range(5)


@dataclass(frozen=True)
class RunConfig:
    """One simulated run: the policy (name, params, which oracle it sees) and the knobs."""

    policy: str
    params: dict[str, object] = field(default_factory=dict)
    oracle: OracleKind = "telemetry"
    label: str = ""
    congestion: float = 1.0
    telemetry_interval_s: float | None = None
    telemetry_delay_s: float | None = None
    telemetry_noise: float | None = None

    @property
    def name(self) -> str:
        return self.label or (self.policy if self.oracle == "telemetry"
                              else f"{self.policy}@{self.oracle}")


@dataclass
class RunResult:
    """Per-request outcomes of one run (arrays indexed by request)."""

    name: str
    ttft_s: FloatArray
    tbt_s: FloatArray
    slo_ttft_s: FloatArray
    transfer_s: FloatArray
    queue_s: FloatArray
    prefill_s: FloatArray  # arrival to KV ready at the prefill instance (queue + compute)
    kv_bytes: FloatArray
    tier: IntArray
    completions: IntArray
    decision_s: FloatArray
    predicted_ttft_s: FloatArray
    requested_bytes: float
    delivered_bytes: float
    wall_s: float = 0.0


class _Decoder:
    __slots__ = ("batch", "cache", "capacity", "ctx", "host", "last", "need", "queue",
                 "step_s", "version")

    def __init__(self, host: int, capacity: float, cache_blocks: int) -> None:
        self.host = host
        self.capacity = capacity
        self.cache = PrefixCache(cache_blocks)
        self.queue: deque[int] = deque()
        self.batch: dict[int, float] = {}  # request -> output tokens still to produce
        self.ctx = 0.0  # KV tokens the batch reads per step
        self.need = 0.0
        self.last = 0.0
        self.step_s = 0.0
        self.version = 0


class Simulation:
    """One scenario and trace; :meth:`run` simulates one policy from a clean state."""

    def __init__(self, scenario: Scenario, trace: Trace) -> None:
        self.scenario = scenario
        self.trace = trace
        topo = scenario.topology
        spec = scenario.spec
        self.topology = topo
        self.bpt = float(scenario.model.bytes_per_token)
        prefills = topo.instances_with_role("prefill")
        decodes = topo.instances_with_role("decode")
        self.prefill_host = np.array([topo.host_index[i.host] for i in prefills], np.int64)
        self.prefill_gpus = np.array([i.gpus for i in prefills], np.float64)
        self.decode_host = np.array([topo.host_index[i.host] for i in decodes], np.int64)
        self.decode_gpus = np.array([i.gpus for i in decodes], np.float64)
        mem = [scenario.free_memory_bytes(int(g)) for g in self.prefill_gpus]
        self.prefill_cache_blocks = [
            int(m * spec.prefill.cache_memory_fraction / (self.bpt * BLOCK_TOKENS)) for m in mem]
        dmem = np.array([scenario.free_memory_bytes(int(g)) for g in self.decode_gpus])
        self.decode_capacity = dmem * spec.decode.kv_memory_fraction / self.bpt
        self.flops_rate = self.prefill_gpus * spec.gpu.peak_tflops * 1e12 * spec.prefill.mfu
        self.hbm_rate = self.decode_gpus * spec.gpu.hbm_tb_s * 1e12 * spec.decode.mbu
        self.layers = scenario.model.layers
        # Ideal TTFT (no queue, no cache, idle same-leaf path, empty decoder) sets the SLO.
        nic = float(topo.capacity[topo.up_chain[0, 0]])
        ideal = (np.array([self.prefill_time(0, int(n), 0) for n in trace.input_tokens])
                 + trace.input_tokens * self.bpt / nic
                 + self.step_time(0, float(np.median(trace.input_tokens))))
        self.slo_ttft = np.maximum(spec.slo.ttft_scale * ideal, spec.slo.ttft_floor_s)

    # -- models ----------------------------------------------------------------------------
    def prefill_time(self, p: int, tokens: int, hit_blocks: int) -> float:
        cached = min(hit_blocks * BLOCK_TOKENS, tokens - 1)
        new = tokens - cached
        spec = self.scenario.spec
        params = spec.model.params_billion * 1e9
        flops = 2.0 * params * new + 4.0 * self.layers * spec.model.hidden * new * (
            cached + new / 2.0)
        return float(flops / self.flops_rate[p] + spec.prefill.overhead_s)

    def step_time(self, d: int, ctx_tokens: float) -> float:
        weights = self.scenario.weights_bytes
        return float((weights + ctx_tokens * self.bpt) / self.hbm_rate[d]
                     + self.scenario.spec.decode.step_overhead_s)

    # -- the run -----------------------------------------------------------------------------
    def run(self, config: RunConfig,
            progress: Callable[[int], object] | None = None) -> RunResult:
        wall = time.perf_counter()
        spec = self.scenario.spec
        topo = self.topology
        trace = self.trace
        n = len(trace)
        n_p = self.prefill_host.shape[0]
        n_d = self.decode_host.shape[0]
        params = dict(spec.policies.get(config.policy, {}))
        params.update(config.params)
        engine = DecisionEngine(make_policy(config.policy, params), topo,
                                history=max(2 * n, 16))
        tel = spec.telemetry
        if config.telemetry_interval_s is not None:
            tel = type(tel)(config.telemetry_interval_s, tel.delay_s, tel.noise, tel.floor)
        if config.telemetry_delay_s is not None:
            tel = type(tel)(tel.interval_s, config.telemetry_delay_s, tel.noise, tel.floor)
        if config.telemetry_noise is not None:
            tel = type(tel)(tel.interval_s, tel.delay_s, config.telemetry_noise, tel.floor)
        fabric = Fabric(topo)
        history = BackgroundHistory(topo.n_links)
        view = TelemetryView(topo, history, tel, spec.seed,
                             ground_truth=config.oracle == "truth")
        horizon = float(trace.arrival_s[-1]) + 3600.0
        spots = hot_spots(topo, spec.background, horizon, spec.seed, config.congestion)

        events: list[tuple[float, int, int, int, int]] = []
        seq = 0

        def push(t: float, kind: int, a: int, b: int = 0) -> None:
            nonlocal seq
            seq += 1
            heapq.heappush(events, (t, seq, kind, a, b))

        for i, s in enumerate(spots):
            push(s.start_s, BACKGROUND, i, 1)
            push(s.end_s, BACKGROUND, i, -1)
        for r in range(n):
            push(float(trace.arrival_s[r]), ARRIVAL, r)

        # Per-request state.
        prefill_of = np.full(n, -1, np.int64)
        decode_of = np.full(n, -1, np.int64)
        need = (trace.input_tokens + trace.output_tokens).astype(np.float64)
        ctx = (trace.input_tokens + trace.output_tokens / 2.0).astype(np.float64)
        hits = np.zeros(n, np.int64)
        kv_bytes = np.zeros(n)
        tier = np.full(n, -1, np.int64)
        t_ready = np.zeros(n)
        t_admit = np.zeros(n)
        t_join = np.zeros(n)
        ttft = np.full(n, np.nan)
        tbt = np.full(n, np.nan)
        completions = np.zeros(n, np.int64)
        predicted = np.full(n, np.nan)
        bookings: dict[int, Booking] = {}
        requested = 0.0

        # Prefill instances.
        caches = [PrefixCache(c) for c in self.prefill_cache_blocks]
        p_queue: list[deque[int]] = [deque() for _ in range(n_p)]
        p_busy_until = np.zeros(n_p)
        p_backlog = np.zeros(n_p)  # estimated compute of queued, not started, requests
        p_estimate = np.zeros(n)
        p_active = np.full(n_p, -1, np.int64)

        # Decode instances and the router's view of them.
        cache_blocks = [int(c * spec.decode.prefix_cache_fraction / BLOCK_TOKENS)
                        for c in self.decode_capacity]
        decoders = [_Decoder(int(h), float(c), b) for h, c, b in
                    zip(self.decode_host, self.decode_capacity, cache_blocks, strict=True)]
        running = np.zeros(n_d, np.int64)
        waiting = np.zeros(n_d, np.int64)
        used = np.zeros(n_d)
        waiting_tokens = np.zeros(n_d)
        step_s = np.array([self.step_time(d, 0.0) for d in range(n_d)])
        for d, dec in enumerate(decoders):
            dec.step_s = float(step_s[d])

        def candidates() -> CandidateView:
            return CandidateView(host=self.decode_host, running=running, waiting=waiting,
                                 kv_use=used / self.decode_capacity,
                                 capacity_tokens=self.decode_capacity, tbt_s=step_s,
                                 waiting_tokens=waiting_tokens)

        def prefill_wait(now: float) -> FloatArray:
            out: FloatArray = np.maximum(p_busy_until - now, 0.0) + p_backlog
            return out

        def start_prefill(p: int, now: float) -> None:
            if p_active[p] >= 0 or not p_queue[p]:
                return
            r = p_queue[p].popleft()
            p_backlog[p] -= p_estimate[r]
            hit = caches[p].match(trace.hash_ids[r])
            hits[r] = hit
            done = now + self.prefill_time(p, int(trace.input_tokens[r]), hit)
            p_busy_until[p] = done
            p_active[p] = r
            push(done, PREFILL_DONE, p, r)

        def reschedule_decoder(d: int, now: float) -> None:
            dec = decoders[d]
            dec.step_s = self.step_time(d, dec.ctx)
            step_s[d] = dec.step_s
            dec.version += 1
            if dec.batch:
                left = min(dec.batch.values())
                push(now + max(left, 0.0) * dec.step_s, DECODE, d, dec.version)

        def advance_decoder(d: int, now: float) -> None:
            dec = decoders[d]
            if dec.batch and now > dec.last:
                steps = (now - dec.last) / dec.step_s
                for r in dec.batch:
                    dec.batch[r] -= steps
            dec.last = now

        def join(r: int, d: int, now: float) -> None:
            dec = decoders[d]
            advance_decoder(d, now)
            dec.batch[r] = float(trace.output_tokens[r])
            dec.ctx += ctx[r]
            dec.cache.insert(trace.hash_ids[r])
            t_join[r] = now
            reschedule_decoder(d, now)
            ttft[r] = now + dec.step_s - trace.arrival_s[r]

        def reallocate(now: float) -> None:
            nxt = fabric.reallocate()
            if nxt < float("inf"):
                push(nxt, FLOW, fabric.version)

        def admit(d: int, now: float) -> None:
            nonlocal requested
            dec = decoders[d]
            changed = False
            while dec.queue:
                r = dec.queue[0]
                if used[d] + need[r] > dec.capacity and used[d] > 0:
                    break
                dec.queue.popleft()
                waiting[d] -= 1
                waiting_tokens[d] -= need[r]
                running[d] += 1
                used[d] += need[r]
                t_admit[r] = now
                src, dst = int(self.prefill_host[prefill_of[r]]), dec.host
                overlap = dec.cache.match(trace.hash_ids[r])
                tokens = int(trace.input_tokens[r])
                nbytes = (tokens - min(overlap * BLOCK_TOKENS, tokens)) * self.bpt
                kv_bytes[r] = nbytes
                tier[r] = int(topo.tier(src, dst))
                if nbytes <= 0:
                    join(r, d, now)
                    continue
                requested += nbytes
                bookings[r] = engine.reserve(src, dst, nbytes)
                fabric.add(r, topo.path(src, dst), nbytes)
                changed = True
            if changed:
                reallocate(now)

        last_progress = 0
        finished = 0
        while events:
            now, _, kind, a, b = heapq.heappop(events)
            if kind == ARRIVAL:
                r = a
                tokens = int(trace.input_tokens[r])
                hit_p = np.array([c.match(trace.hash_ids[r]) for c in caches], np.int64)
                compute = np.array([self.prefill_time(p, tokens, int(hit_p[p]))
                                    for p in range(n_p)])
                ready = prefill_wait(now) + compute
                p = int(np.argmin(ready))
                if config.policy == "netkv_pair":
                    fabric.advance(now)
                    oracle = view.refresh(now, fabric.background)
                    req = self._request(r, decoders, PrefillView(self.prefill_host, ready))
                    decision = engine.decide(req, candidates(), oracle)
                    p = int(decision.prefill_index if decision.prefill_index is not None else p)
                prefill_of[r] = p
                p_estimate[r] = compute[p]
                p_backlog[p] += compute[p]
                p_queue[p].append(r)
                start_prefill(p, now)
            elif kind == PREFILL_DONE:
                p, r = a, b
                caches[p].insert(trace.hash_ids[r])
                p_active[p] = -1
                start_prefill(p, now)
                t_ready[r] = now
                fabric.advance(now)
                oracle = view.refresh(now, fabric.background)
                req = self._request(r, decoders, None, src=int(self.prefill_host[p]))
                decision = engine.decide(req, candidates(), oracle)
                d = decision.index
                predicted[r] = decision.ttft_s
                decode_of[r] = d
                decoders[d].queue.append(r)
                waiting[d] += 1
                waiting_tokens[d] += need[r]
                admit(d, now)
            elif kind == FLOW:
                if a != fabric.version:
                    continue
                fabric.advance(now)
                for f in fabric.finished():
                    r = f.request
                    engine.release(bookings.pop(r))
                    join(r, int(decode_of[r]), now)
                reallocate(now)
            elif kind == DECODE:
                d = a
                dec = decoders[d]
                if b != dec.version:
                    continue
                advance_decoder(d, now)
                done = [r for r, left in dec.batch.items() if left <= 1e-6]
                for r in done:
                    del dec.batch[r]
                    dec.ctx -= ctx[r]
                    used[d] -= need[r]
                    running[d] -= 1
                    completions[r] += 1
                    tbt[r] = (now - t_join[r]) / float(trace.output_tokens[r])
                    finished += 1
                if not dec.batch:
                    dec.ctx = 0.0
                reschedule_decoder(d, now)
                admit(d, now)
                if progress is not None and finished - last_progress >= 256:
                    progress(finished - last_progress)
                    last_progress = finished
            else:  # BACKGROUND
                s = spots[a]
                fabric.advance(now)
                fabric.set_background(s.link, b * s.load)
                history.record(now, fabric.background)
                if fabric.flows:
                    reallocate(now)
        if progress is not None:
            progress(finished - last_progress)
        fabric.advance(fabric.now)
        queue = t_admit - t_ready
        transfer = t_join - t_admit
        return RunResult(
            name=config.name, ttft_s=ttft, tbt_s=tbt, slo_ttft_s=self.slo_ttft,
            transfer_s=transfer, queue_s=queue, prefill_s=t_ready - trace.arrival_s,
            kv_bytes=kv_bytes, tier=tier,
            completions=completions, decision_s=engine.recorded().copy(),
            predicted_ttft_s=predicted, requested_bytes=requested,
            delivered_bytes=fabric.delivered_bytes, wall_s=time.perf_counter() - wall)

    def _request(self, r: int, decoders: list[_Decoder], prefill: PrefillView | None,
                 src: int = 0) -> RequestView:
        hashes = self.trace.hash_ids[r]
        overlap = np.array([dec.cache.match(hashes) for dec in decoders], np.int64)
        return RequestView(prefill_host=src, prompt_tokens=int(self.trace.input_tokens[r]),
                           kv_bytes_per_token=self.bpt, overlap_blocks=overlap,
                           block_tokens=BLOCK_TOKENS,
                           output_tokens=int(self.trace.output_tokens[r]), prefill=prefill)
