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
from netkv.core.policies.prediction import DecodeModel, decode_side, predict, transfer_matrix
from netkv.core.policies.views import CandidateView, Decision, RequestView
from netkv.fields import bound


@dataclass(frozen=True, slots=True)
class NetkvParams:
    """``use_bookings`` false ignores own in-flight transfers (an ablation)."""

    use_bookings: bool = True
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
        totals = by_host[inverse] + (queue + first) + prefill.ready_s[:, None]
        p, d = divmod(self.ties.argmin(totals.ravel()), len(candidates))
        k = int(inverse[p])
        return Decision(
            index=d, ttft_s=float(queue[d] + by_host[k, d] + first[d]), queue_s=float(queue[d]),
            transfer_s=float(by_host[k, d]), first_token_s=float(first[d]),
            tier=int(tiers[k][d]), transfer_bytes=float(nbytes[d]), prefill_index=p,
            prefill_s=float(prefill.ready_s[p]))
