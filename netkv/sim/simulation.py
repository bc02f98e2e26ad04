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

from collections.abc import Callable

import numpy as np

from netkv.core.policies import PrefillView, RequestView
from netkv.core.topology import FloatArray, IntArray
from netkv.sim.pools import Decoder
from netkv.sim.prefill_plan import PrefillPlan, prefill_plan
from netkv.sim.runconfig import OracleKind, RunConfig, RunResult
from netkv.sim.scenario import Scenario
from netkv.sim.stages import Run
from netkv.workload.trace import BLOCK_TOKENS, Trace

__all__ = ["OracleKind", "RunConfig", "RunResult", "Simulation"]


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
        self._plan: PrefillPlan | None = None

    def prefill_plan(self) -> PrefillPlan:
        """The prefill side every non-joint run replays (computed once, see
        :mod:`netkv.sim.prefill_plan`)."""
        if self._plan is None:
            bg = self.scenario.spec.background
            self._plan = prefill_plan(self, fetch=bg.model == "elastic" and bool(bg.prefix_fetch))
        return self._plan

    # -- models ----------------------------------------------------------------------------
    def prefill_time(self, p: int, tokens: int, hit_blocks: int) -> float:
        cached = min(hit_blocks * BLOCK_TOKENS, tokens - 1)
        new = tokens - cached
        spec = self.scenario.spec
        params = spec.model.params_billion * 1e9
        flops = 2.0 * params * new + 4.0 * self.layers * spec.model.hidden * new * (
            cached + new / 2.0)
        return float(flops / self.flops_rate[p] + spec.prefill.overhead_s)

    def prefill_times(self, tokens: int, hit_blocks: IntArray) -> FloatArray:
        """:meth:`prefill_time` on every prefill instance at once (``hit_blocks`` per
        instance); the same operations in the same order, so the same floats."""
        cached = np.minimum(hit_blocks * BLOCK_TOKENS, tokens - 1)
        new = tokens - cached
        spec = self.scenario.spec
        params = spec.model.params_billion * 1e9
        flops = 2.0 * params * new + 4.0 * self.layers * spec.model.hidden * new * (
            cached + new / 2.0)
        out: FloatArray = flops / self.flops_rate + spec.prefill.overhead_s
        return out

    def step_time(self, d: int, ctx_tokens: float) -> float:
        weights = self.scenario.weights_bytes
        return float((weights + ctx_tokens * self.bpt) / self.hbm_rate[d]
                     + self.scenario.spec.decode.step_overhead_s)

    # -- the run -----------------------------------------------------------------------------
    def run(self, config: RunConfig,
            progress: Callable[[int], object] | None = None) -> RunResult:
        """Simulate ``config``'s policy from a clean state (see :mod:`netkv.sim.stages`)."""
        return Run(self, config, progress).execute()

    def request_view(self, r: int, decoders: list[Decoder], prefill: PrefillView | None,
                     src: int = 0, *, stream_layers: int = 0,
                     compute_s: float = 0.0, src_nic: float = 0.0,
                     src_booked: tuple[float, float] = (0.0, 0.0)) -> RequestView:
        """What the policy is told about request ``r`` (overlap per decoder from its cache;
        ``src_booked``: bytes and count of the transfers booked out of the prefill's NICs)."""
        hashes = self.trace.hash_ids[r]
        overlap = np.array([dec.cache.match(hashes) for dec in decoders], np.int64)
        return RequestView(prefill_host=src, prompt_tokens=int(self.trace.input_tokens[r]),
                           kv_bytes_per_token=self.bpt, overlap_blocks=overlap,
                           block_tokens=BLOCK_TOKENS,
                           output_tokens=int(self.trace.output_tokens[r]), prefill=prefill,
                           stream_layers=stream_layers, prefill_compute_s=compute_s,
                           src_nic_bytes_s=src_nic, src_nic_booked_bytes=src_booked[0],
                           src_nic_booked_flows=src_booked[1])
