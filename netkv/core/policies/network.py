"""The network-aware policies.

* ``netkv``: the paper's O(|D|) greedy. For every decode candidate, predicted
  ``TTFT = queue + transfer + first step`` (see ``prediction``), with the transfer of only
  the bytes the candidate lacks, priced by the cost oracle and inflated by the transfers this
  scheduler has itself booked on the same links; the argmin wins.
* ``netkv_pair`` (beyond the paper): the joint choice. Given prefill candidates with their
  predicted KV-ready times, pick the prefill instance by ``argmin_{p,d} ready(p) +
  TTFT(p -> d)``, O(|P| |D|), then the decoder for that instance exactly as ``netkv`` does.
  Without prefill candidates it is ``netkv``.

  The transfer the joint term prices starts a whole prefill later (after ``ready(p)`` when
  pulling; when prefill starts, behind its queue, when streaming), so by default
  (``prefill_oracle="static"``) it is priced on the static per-tier prior (distance known,
  congestion not): the live map at arrival mostly shows this scheduler's own in-flight
  transfers (counted by the link counters and again by the bookings), which last tens of
  milliseconds and are gone by then. Priced live (``"live"``, the former rule) the pair moved
  prefills off the least-loaded instance for predicted savings of 0.1-5 s that were that
  transient load (``xpyd-3p1d-rails``, ``a800-64``: worse than ``netkv``). The decoder is then
  chosen on the live map, with ``netkv``'s tie rule, where the map is current.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from netkv.core.costmodel import CostOracle, LinkStateOracle, static_tier_oracle
from netkv.core.policies.base import TieBreaker, decision_from, parse_params
from netkv.core.policies.bookings import Bookings
from netkv.core.policies.prediction import (
    DecodeModel,
    Prediction,
    decode_side,
    exposed,
    nic_bound,
    predict,
    transfer_matrix,
)
from netkv.core.policies.views import CandidateView, Decision, RequestView
from netkv.core.topology import BoolArray, FloatArray, IntArray
from netkv.fields import bound


@dataclass(frozen=True, slots=True)
class NetkvParams:
    """``use_bookings`` false ignores own in-flight transfers (an ablation).
    ``handover_s``: the deployment's fixed cost per transfer (handshake, descriptors,
    decode-side scheduling; measurable from the connector's metrics), paid only when bytes
    move, so a decoder that already holds the whole prompt saves it. ``prefill_margin_s``
    (``netkv_pair``): keep the cache+load-aware prefill pick unless the joint choice is
    predicted to save more than this (its prediction looks a prefill ahead).
    ``tie_rel``: candidates whose predicted TTFT is within ``tie_rel`` x the best candidate's
    predicted transfer of the best are a tie the telemetry cannot resolve (its per-link
    estimates carry a relative error of this order: 10% log-normal in the simulator's
    telemetry, a choice stated there); among them the lowest tier (the static ranking: same
    host, then rail, then pod, ...) wins, then the lowest prediction. 0 turns it off.
    ``tie_rule`` says what decides among those near-ties: ``load`` (default) the candidate
    with the least KV in use among those of no higher tier than the best (the decode-side
    load the predictor leaves out: a fuller decoder steps slower for this and every later
    request, what llm-d's KV-utilisation scorer weighs), ``tier`` the lowest tier, then the
    lowest prediction (the rule before, an ablation).
    ``prefill_oracle`` (``netkv_pair``): what prices the joint term that picks the prefill
    instance, ``static`` (the per-tier prior, default) or ``live`` (the oracle given, with
    bookings: the rule before; an ablation)."""

    use_bookings: bool = True
    handover_s: float = field(default=0.0, metadata=bound(ge=0))
    prefill_margin_s: float = field(default=0.1, metadata=bound(ge=0))
    tie_rel: float = field(default=0.1, metadata=bound(ge=0, le=1))
    tie_rule: Literal["load", "tier"] = "load"
    prefill_oracle: Literal["static", "live"] = "static"
    seed: int = 0
    tbt_s: float = field(default=0.03, metadata=bound(gt=0))
    residence_s: float = field(default=10.0, metadata=bound(gt=0))


class Netkv:
    name = "netkv"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = parse_params(NetkvParams, params, self.name)
        self.model = DecodeModel(self.params.tbt_s, self.params.residence_s)
        self.ties = TieBreaker(self.params.seed)

    def decide(self, request: RequestView, candidates: CandidateView, oracle: CostOracle,
               bookings: Bookings | None = None) -> Decision:
        pred = predict(self.model, request, candidates, oracle,
                       bookings if self.params.use_bookings else None)
        if self.params.handover_s > 0:
            pred = with_handover(pred, self.params.handover_s)
        scores = pred.ttft_s
        chosen = self.ties.argmin(scores)
        if self.params.tie_rel > 0 and self.params.tie_rule == "load":
            chosen = prefer_less_loaded(scores, pred.transfer_s, pred.tier, candidates.kv_use,
                                        chosen, tie_rel=self.params.tie_rel, ties=self.ties)
        elif self.params.tie_rel > 0:
            chosen = prefer_lower_tier(scores, pred.transfer_s, pred.tier, chosen,
                                       tie_rel=self.params.tie_rel, ties=self.ties)
        return decision_from(pred, chosen, chosen, scores)


class NetkvPair(Netkv):
    name = "netkv_pair"
    _static: LinkStateOracle | None = None

    def decide(self, request: RequestView, candidates: CandidateView, oracle: CostOracle,
               bookings: Bookings | None = None) -> Decision:
        prefill = request.prefill
        if prefill is None:
            return super().decide(request, candidates, oracle, bookings)
        live = self.params.prefill_oracle == "live"
        booked = bookings if self.params.use_bookings and live else None
        prior: CostOracle = oracle if live else self._prior(oracle)
        queue, first, nbytes = decode_side(self.model, request, candidates)
        # Prefill hosts repeat (several instances per host): price each host's paths once.
        hosts, inverse = np.unique(prefill.host, return_inverse=True)
        by_host, tiers = transfer_matrix(prior, booked, hosts, candidates.host, nbytes)
        transfer = by_host[inverse]
        src_nic = (prefill.nic_bytes_s[:, None] if prefill.nic_bytes_s is not None
                   else request.src_nic_bytes_s)
        transfer = nic_bound(transfer, tiers[inverse], nbytes, src_nic, candidates.nic_bytes_s)
        if request.stream_layers > 0 and prefill.compute_s is not None:
            transfer = exposed(transfer, prefill.compute_s[:, None], request.stream_layers)
        if self.params.handover_s > 0:
            transfer = transfer + np.where(nbytes > 0, self.params.handover_s, 0.0)
        totals = transfer + (queue + first) + prefill.ready_s[:, None]
        p = divmod(self.ties.argmin(totals.ravel()), len(candidates))[0]
        if self.params.prefill_margin_s > 0:
            usual = int(np.argmin(prefill.ready_s))
            if totals[usual].min() - totals[p].min() <= self.params.prefill_margin_s:
                p = usual
        # The decoder for that prefill instance, on the live map, as netkv picks it.
        single = replace(
            request, prefill=None, prefill_host=int(prefill.host[p]),
            src_nic_bytes_s=(float(prefill.nic_bytes_s[p]) if prefill.nic_bytes_s is not None
                             else request.src_nic_bytes_s),
            prefill_compute_s=(float(prefill.compute_s[p]) if prefill.compute_s is not None
                               else request.prefill_compute_s))
        return replace(super().decide(single, candidates, oracle, bookings), prefill_index=p,
                       prefill_s=float(prefill.ready_s[p]))

    def _prior(self, oracle: CostOracle) -> CostOracle:
        """The static per-tier prior over the oracle's topology (cached), or the oracle
        itself when it has no topology to build one from."""
        topology = getattr(oracle, "topology", None)
        if topology is None:
            return oracle
        if self._static is None or self._static.topology is not topology:
            self._static = static_tier_oracle(topology)
        return self._static


def prefer_lower_tier(scores: FloatArray, transfer_s: FloatArray, tier: IntArray, best: int,
                      *, tie_rel: float, ties: TieBreaker) -> int:
    """Among candidates predicted within ``tie_rel * transfer_s[best]`` of ``scores[best]``
    (an error the telemetry cannot resolve), the one of lowest tier, then lowest score."""
    slack = tie_rel * float(transfer_s[best])
    if slack <= 0:
        return best
    near = scores <= float(scores[best]) + slack
    if np.count_nonzero(near) == 1:
        return best
    low = int(tier[near].min())
    if int(tier[best]) == low:
        return best
    masked: FloatArray = np.where(near & (tier == low), scores, np.inf)
    return ties.argmin(masked)


def near_ties(scores: FloatArray, transfer_s: FloatArray, tier: IntArray, best: int,
              tie_rel: float, *, out: tuple[BoolArray, BoolArray] | None = None
              ) -> BoolArray | None:
    """The candidates predicted within ``tie_rel * transfer_s[best]`` of ``scores[best]`` and
    of no higher tier than ``best`` (``best`` among them); None when ``best`` stands alone.
    ``out``: two bool arrays of the scores' shape to compute in (the first is returned)."""
    slack = tie_rel * float(transfer_s.item(best))
    if slack <= 0:
        return None
    near, low = (None, None) if out is None else out
    near = np.less_equal(scores, float(scores.item(best)) + slack, out=near)
    near &= np.less_equal(tier, tier.item(best), out=low)
    if np.count_nonzero(near) == 1:
        return None
    return near


def prefer_less_loaded(scores: FloatArray, transfer_s: FloatArray, tier: IntArray,
                       kv_use: FloatArray, best: int, *, tie_rel: float,
                       ties: TieBreaker) -> int:
    """Among the :func:`near_ties` of ``best``, the one with the least KV in use (ties at
    random)."""
    near = near_ties(scores, transfer_s, tier, best, tie_rel)
    if near is None:
        return best
    masked: FloatArray = np.where(near, kv_use, np.inf)
    return ties.argmin(masked)


def with_handover(pred: Prediction, handover_s: float) -> Prediction:
    """The prediction with the fixed per-transfer cost added where bytes move."""
    extra = np.where(pred.transfer_bytes > 0, handover_s, 0.0)
    return Prediction(pred.queue_s, pred.transfer_s + extra, pred.first_token_s, pred.tier,
                      pred.transfer_bytes)
