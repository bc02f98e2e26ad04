"""The network-aware policies.

* ``netkv``: the paper's O(|D|) greedy. For every decode candidate, predicted
  ``TTFT = queue + transfer + first step`` (see ``prediction``), with the transfer of only
  the bytes the candidate lacks, priced by the cost oracle and inflated by the transfers this
  scheduler has itself booked on the same links; the argmin wins.
* ``netkv_pair`` (beyond the paper): the joint choice. Given prefill candidates with their
  predicted KV-ready times, pick ``argmin_{p,d} ready(p) + TTFT(p -> d)``, O(|P| |D|).
  Without prefill candidates it is ``netkv``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from netkv.core.costmodel import CostOracle
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
from netkv.fields import bound


@dataclass(frozen=True, slots=True)
class NetkvParams:
    """``use_bookings`` false ignores own in-flight transfers (an ablation).
    ``handover_s``: the deployment's fixed cost per transfer (handshake, descriptors,
    decode-side scheduling; measurable from the connector's metrics), paid only when bytes
    move, so a decoder that already holds the whole prompt saves it. ``prefill_margin_s``
    (``netkv_pair``): keep the cache+load-aware prefill pick unless the joint choice is
    predicted to save more than this (its prediction looks a prefill ahead)."""

    use_bookings: bool = True
    handover_s: float = field(default=0.0, metadata=bound(ge=0))
    prefill_margin_s: float = field(default=0.1, metadata=bound(ge=0))
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
        return decision_from(pred, chosen, chosen, scores)


class NetkvPair(Netkv):
    name = "netkv_pair"

    def decide(self, request: RequestView, candidates: CandidateView, oracle: CostOracle,
               bookings: Bookings | None = None) -> Decision:
        prefill = request.prefill
        if prefill is None:
            return super().decide(request, candidates, oracle, bookings)
        booked = bookings if self.params.use_bookings else None
        queue, first, nbytes = decode_side(self.model, request, candidates)
        # Prefill hosts repeat (several instances per host): price each host's paths once.
        hosts, inverse = np.unique(prefill.host, return_inverse=True)
        by_host, tiers = transfer_matrix(oracle, booked, hosts, candidates.host, nbytes)
        transfer = by_host[inverse]
        src_nic = (prefill.nic_bytes_s[:, None] if prefill.nic_bytes_s is not None
                   else request.src_nic_bytes_s)
        transfer = nic_bound(transfer, tiers[inverse], nbytes, src_nic, candidates.nic_bytes_s)
        if request.stream_layers > 0 and prefill.compute_s is not None:
            transfer = exposed(transfer, prefill.compute_s[:, None], request.stream_layers)
        if self.params.handover_s > 0:
            transfer = transfer + np.where(nbytes > 0, self.params.handover_s, 0.0)
        totals = transfer + (queue + first) + prefill.ready_s[:, None]
        p, d = divmod(self.ties.argmin(totals.ravel()), len(candidates))
        if self.params.prefill_margin_s > 0:
            usual = int(np.argmin(prefill.ready_s))
            if totals[usual].min() - totals[p, d] <= self.params.prefill_margin_s:
                p, d = usual, self.ties.argmin(totals[usual])
        k = int(inverse[p])
        return Decision(
            index=d, ttft_s=float(queue[d] + transfer[p, d] + first[d]),
            queue_s=float(queue[d]), transfer_s=float(transfer[p, d]),
            first_token_s=float(first[d]), tier=int(tiers[k][d]),
            transfer_bytes=float(nbytes[d]), prefill_index=p,
            prefill_s=float(prefill.ready_s[p]))


def with_handover(pred: Prediction, handover_s: float) -> Prediction:
    """The prediction with the fixed per-transfer cost added where bytes move."""
    extra = np.where(pred.transfer_bytes > 0, handover_s, 0.0)
    return Prediction(pred.queue_s, pred.transfer_s + extra, pred.first_token_s, pred.tier,
                      pred.transfer_bytes)
