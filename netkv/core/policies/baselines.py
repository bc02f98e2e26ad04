"""The baselines NetKV is measured against, written as their projects describe them.

* ``round_robin``: the next candidate in turn.
* ``least_loaded``: fewest requests (running + waiting), or lowest KV use.
* ``cache_load``: NVIDIA Dynamo's KV-router cost,
  ``prefill_load_scale * max(prompt_blocks - overlap_blocks, 0) + decode_blocks`` (lower wins);
  ``decode_blocks`` are the KV blocks active on the decoder. The weight is what the simulator's
  grid search tunes.
* ``llmd_weighted``: llm-d's scorer profile, each scorer clamped to [0, 1] and summed with its
  weight: queue (``(maxQ - q) / (maxQ - minQ)``, weight 2), KV utilisation (``1 - use``,
  weight 2), prefix (``matched / total`` blocks, weight 3) and the static topology curve
  (weight 1) over the tier to the prefill host: tier 0 same host -> ``host`` 1.0, tier 1 same
  leaf -> ``rack`` 0.2, tier 2 same pod -> ``zone`` 0.05, tier 3 across the core ->
  ``region`` 0.02. Highest score wins.

None of them looks at congestion; each still reports the shared TTFT prediction for its pick.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from netkv.core.costmodel import CostOracle
from netkv.core.policies.base import TieBreaker, decision_from, parse_params, require_overlap
from netkv.core.policies.bookings import Bookings
from netkv.core.policies.prediction import DecodeModel, predict, tiers_to
from netkv.core.policies.views import CandidateView, Decision, RequestView
from netkv.core.topology import FloatArray
from netkv.fields import bound


def _report(model: DecodeModel, request: RequestView, candidates: CandidateView,
            oracle: CostOracle, bookings: Bookings | None, *, chosen: int,
            scores: FloatArray | None) -> Decision:
    pred = predict(model, request, candidates, oracle, bookings,
                   index=np.array([chosen], dtype=np.int64))
    return decision_from(pred, 0, chosen, scores)


@dataclass(frozen=True, slots=True)
class RoundRobinParams:
    start: int = field(default=0, metadata=bound(ge=0))
    tbt_s: float = field(default=0.03, metadata=bound(gt=0))
    residence_s: float = field(default=10.0, metadata=bound(gt=0))


class RoundRobin:
    name = "round_robin"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = parse_params(RoundRobinParams, params, self.name)
        self.model = DecodeModel(self.params.tbt_s, self.params.residence_s)
        self.next = self.params.start

    def decide(self, request: RequestView, candidates: CandidateView, oracle: CostOracle,
               bookings: Bookings | None = None) -> Decision:
        chosen = self.next % len(candidates)
        self.next = chosen + 1
        return _report(self.model, request, candidates, oracle, bookings,
                       chosen=chosen, scores=None)


@dataclass(frozen=True, slots=True)
class LeastLoadedParams:
    metric: Literal["requests", "kv"] = "requests"
    seed: int = 0
    tbt_s: float = field(default=0.03, metadata=bound(gt=0))
    residence_s: float = field(default=10.0, metadata=bound(gt=0))


class LeastLoaded:
    name = "least_loaded"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = parse_params(LeastLoadedParams, params, self.name)
        self.model = DecodeModel(self.params.tbt_s, self.params.residence_s)
        self.ties = TieBreaker(self.params.seed)

    def decide(self, request: RequestView, candidates: CandidateView, oracle: CostOracle,
               bookings: Bookings | None = None) -> Decision:
        if self.params.metric == "kv":
            scores = candidates.kv_use.astype(np.float64)
        else:
            scores = (candidates.running + candidates.waiting).astype(np.float64)
        chosen = self.ties.argmin(scores)
        return _report(self.model, request, candidates, oracle, bookings,
                       chosen=chosen, scores=scores)


@dataclass(frozen=True, slots=True)
class CacheLoadParams:
    prefill_load_scale: float = field(default=1.0, metadata=bound(ge=0))
    seed: int = 0
    tbt_s: float = field(default=0.03, metadata=bound(gt=0))
    residence_s: float = field(default=10.0, metadata=bound(gt=0))


class CacheLoad:
    name = "cache_load"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = parse_params(CacheLoadParams, params, self.name)
        self.model = DecodeModel(self.params.tbt_s, self.params.residence_s)
        self.ties = TieBreaker(self.params.seed)

    def decide(self, request: RequestView, candidates: CandidateView, oracle: CostOracle,
               bookings: Bookings | None = None) -> Decision:
        overlap = require_overlap(request, len(candidates))
        missing = np.maximum(request.prompt_blocks - overlap, 0).astype(np.float64)
        decode_blocks = candidates.kv_use * candidates.capacity_tokens / request.block_tokens
        scores: FloatArray = self.params.prefill_load_scale * missing + decode_blocks
        chosen = self.ties.argmin(scores)
        return _report(self.model, request, candidates, oracle, bookings,
                       chosen=chosen, scores=scores)


# llm-d's topology-affinity curve, indexed by tier 0..3 (host, rack, zone, region).
LLMD_TOPOLOGY_CURVE: FloatArray = np.array([1.0, 0.2, 0.05, 0.02])


@dataclass(frozen=True, slots=True)
class LlmdParams:
    queue_weight: float = field(default=2.0, metadata=bound(ge=0))
    kv_weight: float = field(default=2.0, metadata=bound(ge=0))
    prefix_weight: float = field(default=3.0, metadata=bound(ge=0))
    topology_weight: float = field(default=1.0, metadata=bound(ge=0))
    seed: int = 0
    tbt_s: float = field(default=0.03, metadata=bound(gt=0))
    residence_s: float = field(default=10.0, metadata=bound(gt=0))


class LlmdWeighted:
    name = "llmd_weighted"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = parse_params(LlmdParams, params, self.name)
        self.model = DecodeModel(self.params.tbt_s, self.params.residence_s)
        self.ties = TieBreaker(self.params.seed)

    def decide(self, request: RequestView, candidates: CandidateView, oracle: CostOracle,
               bookings: Bookings | None = None) -> Decision:
        p = self.params
        queue = candidates.waiting.astype(np.float64)
        spread = queue.max() - queue.min()
        queue_score = (queue.max() - queue) / spread if spread > 0 else np.ones_like(queue)
        kv_score = np.clip(1.0 - candidates.kv_use, 0.0, 1.0)
        overlap = require_overlap(request, len(candidates))
        prefix_score = np.clip(overlap / max(request.prompt_blocks, 1), 0.0, 1.0)
        # The tier alone (zero bytes): llm-d's curve is static, it never sees congestion.
        tiers = tiers_to(oracle, request.prefill_host, candidates.host)
        topo_score = LLMD_TOPOLOGY_CURVE[tiers]
        total = (p.queue_weight * queue_score + p.kv_weight * kv_score
                 + p.prefix_weight * prefix_score + p.topology_weight * topo_score)
        scores: FloatArray = -total
        chosen = self.ties.argmin(scores)
        return _report(self.model, request, candidates, oracle, bookings,
                       chosen=chosen, scores=scores)


@dataclass(frozen=True, slots=True)
class LlmdPrefillFirstParams:
    """llm-d's decode profile in ``stageOrder: prefill-first`` mode (v0.10.0, #2342): the
    prefill pick is published as ``peer-endpoint`` and the decode profile scores prefix
    (weight 2) and queue (weight 1), as in ``deploy/config/pd-topology-epp-config.yaml``,
    plus ``topology-affinity-scorer`` (weight 1) against the peer; no KV-utilisation
    scorer."""

    queue_weight: float = field(default=1.0, metadata=bound(ge=0))
    kv_weight: float = field(default=0.0, metadata=bound(ge=0))
    prefix_weight: float = field(default=2.0, metadata=bound(ge=0))
    topology_weight: float = field(default=1.0, metadata=bound(ge=0))
    seed: int = 0
    tbt_s: float = field(default=0.03, metadata=bound(gt=0))
    residence_s: float = field(default=10.0, metadata=bound(gt=0))


class LlmdPrefillFirst(LlmdWeighted):
    name = "llmd_prefill_first"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        p = parse_params(LlmdPrefillFirstParams, params, self.name)
        self.params = LlmdParams(p.queue_weight, p.kv_weight, p.prefix_weight,
                                 p.topology_weight, p.seed, p.tbt_s, p.residence_s)
        self.model = DecodeModel(p.tbt_s, p.residence_s)
        self.ties = TieBreaker(p.seed)


@dataclass(frozen=True, slots=True)
class PowerOfTwoParams:
    seed: int = 0
    tbt_s: float = field(default=0.03, metadata=bound(gt=0))
    residence_s: float = field(default=10.0, metadata=bound(gt=0))


class PowerOfTwo:
    """SGLang's and vLLM's router ``power_of_two``: two candidates at random, the one with
    fewer requests (running + waiting) wins; independent of the prefill pick."""

    name = "power_of_two"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = parse_params(PowerOfTwoParams, params, self.name)
        self.model = DecodeModel(self.params.tbt_s, self.params.residence_s)
        self.rng = np.random.default_rng(self.params.seed)

    def decide(self, request: RequestView, candidates: CandidateView, oracle: CostOracle,
               bookings: Bookings | None = None) -> Decision:
        n = len(candidates)
        load = candidates.running + candidates.waiting
        if n == 1:
            chosen = 0
        else:
            a, b = (int(x) for x in self.rng.choice(n, size=2, replace=False))
            chosen = a if load[a] <= load[b] else b
        return _report(self.model, request, candidates, oracle, bookings,
                       chosen=chosen, scores=None)


@dataclass(frozen=True, slots=True)
class CacheAwareParams:
    """SGLang router ``cache_aware`` defaults: imbalanced iff ``max - min > 64`` and
    ``max > 1.5 * min``; route to the longest prefix match iff its ratio is above 0.3."""

    balance_abs_threshold: float = field(default=64.0, metadata=bound(ge=0))
    balance_rel_threshold: float = field(default=1.5, metadata=bound(ge=1))
    cache_threshold: float = field(default=0.3, metadata=bound(ge=0, le=1))
    seed: int = 0
    tbt_s: float = field(default=0.03, metadata=bound(gt=0))
    residence_s: float = field(default=10.0, metadata=bound(gt=0))


class CacheAware:
    """SGLang's (and vLLM's Rust router's) ``cache_aware`` policy applied to the decode
    pick, independently of the prefill pick: least loaded when the workers are imbalanced,
    else the longest prefix match if it is good enough, else least loaded."""

    name = "cache_aware"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = parse_params(CacheAwareParams, params, self.name)
        self.model = DecodeModel(self.params.tbt_s, self.params.residence_s)
        self.ties = TieBreaker(self.params.seed)

    def decide(self, request: RequestView, candidates: CandidateView, oracle: CostOracle,
               bookings: Bookings | None = None) -> Decision:
        p = self.params
        load = (candidates.running + candidates.waiting).astype(np.float64)
        hi, lo = float(load.max()), float(load.min())
        overlap = require_overlap(request, len(candidates)).astype(np.float64)
        ratio = overlap / max(request.prompt_blocks, 1)
        imbalanced = hi - lo > p.balance_abs_threshold and hi > p.balance_rel_threshold * lo
        if not imbalanced and float(ratio.max()) > p.cache_threshold:
            scores: FloatArray = -ratio + 1e-6 * load / max(hi, 1.0)
        else:
            scores = load
        chosen = self.ties.argmin(scores)
        return _report(self.model, request, candidates, oracle, bookings,
                       chosen=chosen, scores=scores)


@dataclass(frozen=True, slots=True)
class DynamoDisaggParams:
    """Dynamo's decode routing in disaggregated mode (router-disaggregated-serving.md,
    PR #9893): overlap credit 0, cost = active decode blocks; the prefill worker's topology
    domain as a *preferred* constraint, which multiplies the cost of workers in it by
    ``1 - taint_weight``. ``preferred_tier``: 1 = the prefill's rack (leaf), 2 = its zone
    (pod)."""

    taint_weight: float = field(default=0.5, metadata=bound(ge=0, le=1))
    preferred_tier: int = field(default=1, metadata=bound(ge=0, le=3))
    seed: int = 0
    tbt_s: float = field(default=0.03, metadata=bound(gt=0))
    residence_s: float = field(default=10.0, metadata=bound(gt=0))


class DynamoDisagg:
    name = "dynamo_disagg"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = parse_params(DynamoDisaggParams, params, self.name)
        self.model = DecodeModel(self.params.tbt_s, self.params.residence_s)
        self.ties = TieBreaker(self.params.seed)

    def decide(self, request: RequestView, candidates: CandidateView, oracle: CostOracle,
               bookings: Bookings | None = None) -> Decision:
        p = self.params
        blocks = candidates.kv_use * candidates.capacity_tokens / request.block_tokens
        cost = blocks + float(request.prompt_blocks)  # active + incoming blocks
        tiers = tiers_to(oracle, request.prefill_host, candidates.host)
        scores: FloatArray = np.where(tiers <= p.preferred_tier, cost * (1.0 - p.taint_weight),
                                      cost)
        chosen = self.ties.argmin(scores)
        return _report(self.model, request, candidates, oracle, bookings,
                       chosen=chosen, scores=scores)
