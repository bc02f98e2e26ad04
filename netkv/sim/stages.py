"""One simulated run: the event loop and one method per stage of a request's life.

:class:`Run` holds the run's state (event queue, fabric, telemetry view, instance pools and
per-request arrays) and dispatches each event to its stage: ``arrival`` (choose a prefill
instance; with layer-wise streaming also the decoder), ``start_prefill`` (prefix fetches
from the KV store; streaming starts), ``prefill_done`` (choose a decoder when pulling),
``admit`` (memory at the decoder; the handover, then the transfer), the fabric's ``flow``
completions (``join`` the batch), ``decode`` completions, and the background sources'
and faults' changes (those, and the telemetry samples, in :mod:`netkv.sim.sources_stages`).
See :mod:`netkv.sim.simulation` for the models and the request life cycle.

Size (~500 lines, one concept): the stages are methods of one run's state; the sources'
stages already live in :mod:`netkv.sim.sources_stages`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from netkv.core.costmodel import LinkStateOracle, static_tier_oracle
from netkv.core.policies import Booking, DecisionEngine, PrefillView, make_policy
from netkv.sim.events import EventQueue, Kind
from netkv.sim.fabric import FETCH, INF, KV, Fabric, nic_offsets
from netkv.sim.pools import DecodePool, PrefillPool
from netkv.sim.runconfig import RunConfig, RunResult
from netkv.sim.sources_stages import SourceStages
from netkv.sim.telemetry import BackgroundHistory, NicByteView, NicRateView, TelemetryView
from netkv.workload.trace import BLOCK_TOKENS

if TYPE_CHECKING:
    from netkv.sim.simulation import Simulation

PROGRESS_EVERY = 256
NIC_POLICIES = ("netkv", "netkv_pair")  # the policies that decide by bound-NIC rates
DRAIN_S = 300.0  # background keeps running this long after the last arrival


class Run(SourceStages):
    """The mutable state of one run of one policy; :meth:`execute` runs it to the end."""

    def __init__(self, sim: Simulation, config: RunConfig,
                 progress: Callable[[int], object] | None = None) -> None:
        self.sim = sim
        self.config = config
        self.progress = progress
        spec = sim.scenario.spec
        self.spec = spec
        self.topo = topo = sim.topology
        self.trace = trace = sim.trace
        n = len(trace)
        seed = spec.seed if config.seed is None else config.seed
        params = dict(spec.policies.get(config.policy, {}))
        params.update(config.params)
        if config.policy in ("netkv", "netkv_pair") and spec.network.timing == "pull":
            # The deployment's fixed transfer cost is a measured input (vllm:nixl metrics).
            params.setdefault("handover_s", spec.network.handover_s)
        self.engine = DecisionEngine(make_policy(config.policy, params), topo,
                                     history=max(2 * n, 16))
        self.joint = config.policy == "netkv_pair"
        # The prefill side, the same for every policy but the joint one and every seed.
        self.plan = None if self.joint else sim.prefill_plan()
        self.layerwise = spec.network.timing == "layerwise"
        self.handover_s = spec.network.handover_s
        net = spec.network
        # The per-NIC byte counters cost ~7% of a run's CPU; only the policies that decide by
        # bound-NIC rates read them (the others' reported predictions keep nominal striping).
        self.fabric = Fabric(topo, nics=net.nics_per_host, spines=net.spines_per_pod,
                             salt=seed, count_nics=(config.oracle == "telemetry"
                                                    and config.policy in NIC_POLICIES))
        self.nic_first, self.nic_width = nic_offsets(topo, net.nics_per_host)
        self.history = BackgroundHistory(topo.n_links)
        self.tel = config.telemetry(spec.telemetry)
        self.static: LinkStateOracle | None = (static_tier_oracle(topo)
                                               if config.oracle == "static" else None)
        self.view = TelemetryView(topo, self.history, self.tel, seed,
                                  ground_truth=config.oracle == "truth")
        self.horizon = float(trace.arrival_s[-1]) + DRAIN_S
        self.events = events = EventQueue()
        self.prefill_instances = [topo.instance_index[i.name]
                                  for i in topo.instances_with_role("prefill")]
        self.decode_instances = [topo.instance_index[i.name]
                                 for i in topo.instances_with_role("decode")]
        self.schedule_sources(seed)
        for r in range(n):
            events.push(float(trace.arrival_s[r]), Kind.ARRIVAL, r)

        # Per-request state.
        self.prefill_of = np.full(n, -1, np.int64)
        self.decode_of = np.full(n, -1, np.int64)
        self.need = (trace.input_tokens + trace.output_tokens).astype(np.float64)
        self.ctx = (trace.input_tokens + trace.output_tokens / 2.0).astype(np.float64)
        self.hits = np.zeros(n, np.int64)
        self.kv_bytes = np.zeros(n)
        self.tier = np.full(n, -1, np.int64)
        self.t_ready = np.full(n, np.nan)
        self.t_admit = np.zeros(n)
        self.t_join = np.zeros(n)
        self.t_bytes = np.zeros(n)  # when the transfer's bytes started
        self.t_start = np.full(n, np.nan)  # prefill compute start
        self.ttft = np.full(n, np.nan)
        self.tbt = np.full(n, np.nan)
        self.completions = np.zeros(n, np.int64)
        self.predicted = np.full(n, np.nan)
        self.pending = np.full(n, -1, np.int64)  # subflows in flight (-1: not started)
        self.admitted = np.zeros(n, np.bool_)
        self.bookings: dict[int, Booking] = {}
        self.nic_booked: dict[int, tuple[int, int, float]] = {}
        self.prefill_booked = np.zeros((len(self.prefill_instances), 2))  # bytes, flows
        self.requested = 0.0
        self.finished = 0
        self.reported = 0
        self.store: dict[int, int] = {}  # block hash -> host that first computed it
        self._paths: dict[tuple[int, int], tuple[tuple[int, ...], int]] = {}

        self.prefills = PrefillPool(sim.prefill_host, sim.prefill_cache_blocks, n)
        cache_blocks = [int(c * spec.decode.prefix_cache_fraction / BLOCK_TOKENS)
                        for c in sim.decode_capacity]
        step_s = np.array([sim.step_time(d, 0.0) for d in range(len(sim.decode_host))])
        # The rate of the NICs each instance is bound to: known to the operator (the
        # engine's UCX_NET_DEVICES), so the policies are told it.
        per_nic = topo.capacity[topo.up_chain[:, 0]] / net.nics_per_host
        inst_nic = per_nic[topo.instance_host] * self.nic_width
        self.prefill_nic = inst_nic[self.prefill_instances]
        self.decodes = DecodePool(sim.decode_host, sim.decode_capacity, cache_blocks, step_s,
                                  inst_nic[self.decode_instances])
        # What a NIC fault leaves of those rates, as the agents' per-NIC samples show it.
        self.nic_view = NicRateView(inst_nic, self.tel, config.oracle)
        # How their transfers really split over those NICs, as the per-NIC byte counters
        # show it (a host whose transfers all take one NIC).
        self.byte_view = NicByteView(topo, self.fabric, self.nic_first, self.nic_width,
                                     self.tel, mode=(config.oracle
                                                     if config.policy in NIC_POLICIES
                                                     else "static"),
                                     min_bytes=BLOCK_TOKENS * sim.bpt)
        self.nic_shown = (inst_nic, self.byte_view.ones)

    # -- the loop ---------------------------------------------------------------------------
    def execute(self) -> RunResult:
        wall = time.perf_counter()
        handlers = {Kind.ARRIVAL: self.arrival, Kind.PREFILL_DONE: self.prefill_done,
                    Kind.FLOW: self.flow, Kind.DECODE: self.decode,
                    Kind.BACKGROUND: self.background, Kind.HANDOVER: self.handover,
                    Kind.FAULT: self.fault, Kind.TENANT: self.tenant,
                    Kind.WEIGHTS: self.weights, Kind.SAMPLE: self.sample}
        table = [handlers[Kind(k)] for k in range(len(Kind))]
        events = self.events
        while events:
            now, kind, a, b = events.pop()
            table[kind](now, a, b)
        if self.progress is not None:
            self.progress(self.finished - self.reported)
        self.fabric.advance(self.fabric.now)
        trace = self.trace
        # Only the part of the transfer prefill did not hide counts (all of it when pulling).
        exposed = self.t_join - np.maximum(self.t_admit, self.t_ready)
        return RunResult(
            name=self.config.name, ttft_s=self.ttft, tbt_s=self.tbt,
            slo_ttft_s=self.sim.slo_ttft, transfer_s=exposed,
            queue_s=np.maximum(self.t_admit - self.t_ready, 0.0),
            prefill_s=self.t_ready - trace.arrival_s,
            kv_bytes=self.kv_bytes, tier=self.tier, completions=self.completions,
            decision_s=self.engine.recorded().copy(), predicted_ttft_s=self.predicted,
            requested_bytes=self.requested, delivered_bytes=self.fabric.delivered_bytes,
            wall_s=time.perf_counter() - wall)

    def path(self, src: int, dst: int) -> tuple[tuple[int, ...], int]:
        """Topology links and tier from ``src`` to ``dst`` (cached)."""
        hit = self._paths.get((src, dst))
        if hit is None:
            hit = self._paths[(src, dst)] = (self.topo.path(src, dst),
                                             int(self.topo.tier(src, dst)))
        return hit

    def refresh_nics(self, now: float) -> None:
        """Bring the policies' bound-NIC rates to what is visible at ``now``."""
        rates, factors = self.nic_view.at(now), self.byte_view.at(now)
        if rates is not self.nic_shown[0] or factors is not self.nic_shown[1]:
            self.nic_shown = (rates, factors)
            if factors is not self.byte_view.ones:
                rates = rates * factors
            self.prefill_nic = rates[self.prefill_instances]
            self.decodes.nic_bytes_s = rates[self.decode_instances]

    def oracle(self, now: float) -> LinkStateOracle:
        if self.static is not None:
            return self.static
        self.fabric.advance(now)
        exact = self.fabric.truth_unavailable() if self.view.ground_truth else None
        return self.view.refresh(now, exact)

    # -- stage 1: arrival, prefill choice (and the decoder when streaming) -----------------
    def arrival(self, now: float, r: int, _: int) -> None:
        self.refresh_nics(now)
        if self.plan is not None:
            self.planned_arrival(now, r)
            return
        sim, trace, pool = self.sim, self.trace, self.prefills
        tokens = int(trace.input_tokens[r])
        hit_p = np.array([c.match(trace.hash_ids[r]) for c in pool.caches], np.int64)
        compute = sim.prefill_times(tokens, hit_p)
        ready = pool.wait(now) + compute
        p = int(np.argmin(ready))
        d = -1
        layers = self.sim.layers if self.layerwise else 0
        if self.joint:
            req = sim.request_view(r, self.decodes.decoders,
                                   PrefillView(pool.host, ready, compute, self.prefill_nic),
                                   stream_layers=layers)
            decision = self.engine.decide(req, self.decodes.view(), self.oracle(now))
            p = int(decision.prefill_index if decision.prefill_index is not None else p)
            d = decision.index
        elif self.layerwise:
            req = sim.request_view(r, self.decodes.decoders, None, src=int(pool.host[p]),
                                   stream_layers=layers, compute_s=float(compute[p]),
                                   src_nic=float(self.prefill_nic[p]),
                                        src_booked=self.src_booked(p))
            d = self.engine.decide(req, self.decodes.view(), self.oracle(now)).index
        self.prefill_of[r] = p
        pool.enqueue(p, r, float(compute[p]))
        if self.layerwise:
            self.choose_decoder(r, d, float(ready[p]), now)
        self.start_prefill(p, now)

    def planned_arrival(self, now: float, r: int) -> None:
        """:meth:`arrival` with the prefill choice and estimate from the plan."""
        plan, pool = self.plan, self.prefills
        assert plan is not None
        p = int(plan.prefill[r])
        estimate = float(plan.estimate_s[r])
        d = -1
        if self.layerwise:
            req = self.sim.request_view(r, self.decodes.decoders, None, src=int(pool.host[p]),
                                        stream_layers=self.sim.layers, compute_s=estimate,
                                        src_nic=float(self.prefill_nic[p]),
                                        src_booked=self.src_booked(p))
            d = self.engine.decide(req, self.decodes.view(), self.oracle(now)).index
        self.prefill_of[r] = p
        pool.enqueue(p, r, estimate)
        if self.layerwise:
            self.choose_decoder(r, d, 0.0, now)
        self.start_prefill(p, now)

    def start_prefill(self, p: int, now: float) -> None:
        pool = self.prefills
        r = pool.next_to_start(p)
        if r < 0:
            return
        plan = self.plan
        if plan is not None:
            compute = float(plan.compute_s[r])
            self.hits[r] = plan.hit_blocks[r]
            done = now + compute
            pool.busy_until[p] = done
            pool.active[p] = r
            self.t_start[r] = now
            self.events.push(done, Kind.PREFILL_DONE, p, r)
            if plan.fetches[r]:
                self.add_fetches(r, int(pool.host[p]), plan.fetches[r])
            if self.layerwise and self.admitted[r]:
                self.begin_handover(r, now)
            return
        hashes = self.trace.hash_ids[r]
        hit = pool.caches[p].match(hashes)
        self.hits[r] = hit
        compute = self.sim.prefill_time(p, int(self.trace.input_tokens[r]), hit)
        done = now + compute
        pool.busy_until[p] = done
        pool.active[p] = r
        self.t_start[r] = now
        self.events.push(done, Kind.PREFILL_DONE, p, r)
        if self.elastic and self.spec.background.prefix_fetch:
            self.fetch_prefix(r, int(pool.host[p]), hashes[hit:])
        if self.layerwise and self.admitted[r]:
            self.begin_handover(r, now)

    def fetch_prefix(self, r: int, dst: int, missing: tuple[int, ...]) -> None:
        """Blocks the instance lacks but the KV store holds (computed before, anywhere) are
        fetched from the host that computed them (Mooncake Store / LMCache style); only
        their load on the fabric is modelled, not a compute saving."""
        by_host: dict[int, int] = {}
        for h in missing:
            src = self.store.get(h)
            if src is not None and src != dst:
                by_host[src] = by_host.get(src, 0) + 1
        if by_host:
            self.add_fetches(r, dst, tuple(by_host.items()))

    def add_fetches(self, r: int, dst: int, fetches: tuple[tuple[int, int], ...]) -> None:
        """Load the fabric with ``(source host, blocks)`` fetches of ``r`` to ``dst``."""
        for src, blocks in fetches:
            links = self.path(src, dst)[0]
            phys = self.fabric.resolve(links, r, src, src_host=src, dst_host=dst)
            self.fabric.add(r, phys, blocks * BLOCK_TOKENS * self.sim.bpt, kind=FETCH,
                            sub=src, physical=True)
        self.reallocate()

    # -- stage 2: prefill done, decode choice when pulling ---------------------------------
    def prefill_done(self, now: float, p: int, r: int) -> None:
        pool = self.prefills
        host = int(pool.host[p])
        if self.plan is None:
            hashes = self.trace.hash_ids[r]
            pool.caches[p].insert(hashes)
            for h in hashes:
                self.store.setdefault(h, host)
        pool.active[p] = -1
        self.start_prefill(p, now)
        self.t_ready[r] = now
        if self.layerwise:
            self.streaming_done(r, now)
            return
        self.refresh_nics(now)
        req = self.sim.request_view(r, self.decodes.decoders, None, src=host,
                                    src_nic=float(self.prefill_nic[p]),
                                        src_booked=self.src_booked(p))
        decision = self.engine.decide(req, self.decodes.view(), self.oracle(now))
        self.predicted[r] = decision.ttft_s
        if decision.transfer_bytes > 0:
            # Booked when decided, as the scheduler and the proxy book (with the bytes the
            # decision priced), so the decisions made while it waits for admission and its
            # handover see it; released when it lands.
            self.book(r, p, decision.index, decision.transfer_bytes)
        self.choose_decoder(r, decision.index, 0.0, now)

    def book(self, r: int, p: int, d: int, nbytes: float) -> None:
        """Book ``r``'s transfer from prefill ``p`` to decoder ``d`` on its path's links and,
        off the host, on the two instances' bound NICs (what the scheduler knows it sent
        where)."""
        src, dst = int(self.prefills.host[p]), int(self.decodes.host[d])
        self.bookings[r] = self.engine.reserve(src, dst, nbytes)
        if src != dst:
            self.nic_booked[r] = (p, d, nbytes)
            self.prefill_booked[p, 0] += nbytes
            self.prefill_booked[p, 1] += 1.0
            self.decodes.book(d, nbytes)

    def src_booked(self, p: int) -> tuple[float, float]:
        return float(self.prefill_booked[p, 0]), float(self.prefill_booked[p, 1])

    def unbook(self, r: int) -> None:
        booked = self.bookings.pop(r, None)
        if booked is not None:
            self.engine.release(booked)
        nic = self.nic_booked.pop(r, None)
        if nic is not None:
            p, d, nbytes = nic
            if self.pending[r] == 0 and self.kv_bytes[r] > 0:  # its bytes have landed
                self.byte_view.landed(self.prefill_instances[p], self.decode_instances[d],
                                      float(self.kv_bytes[r]), float(self.t_bytes[r]),
                                      self.fabric.now)
            self.prefill_booked[p, 0] = max(self.prefill_booked[p, 0] - nbytes, 0.0)
            self.prefill_booked[p, 1] -= 1.0
            self.decodes.book(d, -nbytes)

    def choose_decoder(self, r: int, d: int, ready_in_s: float, now: float) -> None:
        self.decode_of[r] = d
        self.decodes.enqueue(d, r, float(self.need[r]))
        self.admit(d, now)

    # -- stage 3: admission at the decoder, handover, transfer start -----------------------
    def admit(self, d: int, now: float) -> None:
        pool = self.decodes
        dec = pool.decoders[d]
        while True:
            r = pool.admit_next(d, self.need)
            if r < 0:
                break
            self.t_admit[r] = now
            self.admitted[r] = True
            src, dst = int(self.prefills.host[self.prefill_of[r]]), dec.host
            overlap = dec.cache.match(self.trace.hash_ids[r])
            tokens = int(self.trace.input_tokens[r])
            nbytes = (tokens - min(overlap * BLOCK_TOKENS, tokens)) * self.sim.bpt
            self.kv_bytes[r] = nbytes
            self.tier[r] = self.path(src, dst)[1]
            if not self.layerwise or not np.isnan(self.t_start[r]):
                self.begin_handover(r, now)

    def begin_handover(self, r: int, now: float) -> None:
        """The fixed per-transfer cost, then the bytes; nothing to pull costs nothing."""
        if self.handover_s > 0 and self.kv_bytes[r] > 0:
            self.events.push(now + self.handover_s, Kind.HANDOVER, r)
        else:
            self.handover(now, r, 0)

    def handover(self, now: float, r: int, _: int) -> None:
        """The fixed per-transfer cost has elapsed: the bytes start to flow (striped over the
        NICs both instances are bound to, one subflow per NIC)."""
        d = int(self.decode_of[r])
        nbytes = float(self.kv_bytes[r])
        if nbytes <= 0:
            self.unbook(r)
            self.pending[r] = 0
            self.maybe_join(r, now)
            return
        p = int(self.prefill_of[r])
        src, dst = int(self.prefills.host[p]), int(self.decodes.host[d])
        self.requested += nbytes
        if r not in self.bookings:  # streaming: booked when the bytes start
            self.book(r, p, d, nbytes)
        pi = self.prefill_instances[p]
        di = self.decode_instances[d]
        width = int(max(min(self.nic_width[pi], self.nic_width[di]), 1)) if src != dst else 1
        links = self.path(src, dst)[0]
        cap = INF
        if self.layerwise and np.isnan(self.t_ready[r]):
            # Streaming: the bytes cannot leave faster than prefill produces them.
            left = max(float(self.prefills.busy_until[p]) - now, 1e-6)
            cap = nbytes / width / left
        self.fabric.advance(now)
        self.t_bytes[r] = now
        for j in range(width):
            phys = self.fabric.resolve(links, r, j, nic_src=int(self.nic_first[pi]),
                                       nic_dst=int(self.nic_first[di]), src_host=src,
                                       dst_host=dst)
            self.fabric.add(r, phys, nbytes / width, sub=j, cap=cap, physical=True)
        self.pending[r] = width
        self.reallocate()

    def streaming_done(self, r: int, now: float) -> None:
        """Prefill finished: a streamed transfer is no longer held back by production."""
        if self.pending[r] > 0:
            self.fabric.advance(now)
            for f in self.fabric.flows.values():
                if f.kind == KV and f.request == r:
                    f.cap = INF
            self.reallocate()
        else:
            self.maybe_join(r, now)

    def reallocate(self) -> None:
        nxt = self.fabric.reallocate()
        if nxt < INF:
            self.events.push(nxt, Kind.FLOW, self.fabric.version)

    # -- stage 4: transfer done, join the batch ---------------------------------------------
    def flow(self, now: float, version: int, _: int) -> None:
        fabric = self.fabric
        if version != fabric.version:
            return
        fabric.advance(now)
        for f in fabric.finished():
            if f.kind != KV:
                continue
            r = f.request
            self.pending[r] -= 1
            if self.pending[r] == 0:
                self.unbook(r)
                self.maybe_join(r, now)
        self.reallocate()

    def maybe_join(self, r: int, now: float) -> None:
        if self.pending[r] == 0 and not np.isnan(self.t_ready[r]):
            self.join(r, int(self.decode_of[r]), now)

    def join(self, r: int, d: int, now: float) -> None:
        self.pending[r] = -2
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
