"""The TTFT predictor every policy reports with and ``netkv`` minimises.

``ttft(d) = queue(d) + transfer(p -> d, bytes d lacks) + first_step(d)``:

* ``queue`` is the wait for KV memory at the decoder: the tokens this request needs (prompt
  plus reserved output) beyond what is free after the admission queue, drained at the rate
  running requests release memory (``used / residence_s``);
* ``transfer`` is the cost oracle's estimate for the bytes the decoder does not already hold,
  plus the delay of the booked transfers it shares its worst link with (see ``bookings``;
  per-link rates come from the oracle when it exposes ``available_bytes_s``, as
  :class:`~netkv.core.oracle.LinkStateOracle` does, else from link capacities);
* ``first_step`` is the decoder's current time per output token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from netkv.core.oracle import CostOracle
from netkv.core.policies.bookings import Bookings
from netkv.core.policies.views import CandidateView, RequestView
from netkv.core.topology import FloatArray, IntArray
from netkv.fields import bound


@dataclass(frozen=True, slots=True)
class DecodeModel:
    """Defaults for what a candidate view may leave out."""

    tbt_s: float = field(default=0.03, metadata=bound(gt=0))
    residence_s: float = field(default=10.0, metadata=bound(gt=0))


@dataclass(frozen=True, slots=True)
class Prediction:
    """Vectorised TTFT parts over a set of candidates."""

    queue_s: FloatArray
    transfer_s: FloatArray
    first_token_s: FloatArray
    tier: IntArray
    transfer_bytes: FloatArray

    @property
    def ttft_s(self) -> FloatArray:
        out: FloatArray = self.queue_s + self.transfer_s + self.first_token_s
        return out


def predict(
    model: DecodeModel,
    request: RequestView,
    candidates: CandidateView,
    oracle: CostOracle,
    bookings: Bookings | None,
    *,
    index: IntArray | None = None,
    src_host: int | None = None,
) -> Prediction:
    """Predict for all candidates, or only those in ``index`` (baselines report their pick)."""
    sel = slice(None) if index is None else index
    host = candidates.host[sel]
    n = host.shape[0]
    src = request.prefill_host if src_host is None else src_host
    delta = request.delta_tokens(len(candidates))[sel]
    nbytes = delta * request.kv_bytes_per_token
    est = oracle.estimate(src, host, nbytes)
    transfer = est.seconds
    if bookings is not None:
        rates = getattr(oracle, "available_bytes_s", None)  # a LinkStateOracle's per-link view
        transfer = transfer + bookings.extra_seconds(src, host, nbytes, rates)
    capacity = candidates.capacity_tokens[sel]
    used = candidates.kv_use[sel] * capacity
    pending = (candidates.waiting_tokens[sel] if candidates.waiting_tokens is not None
               else candidates.waiting[sel] * float(request.prompt_tokens + request.output_tokens))
    need = float(request.prompt_tokens + request.output_tokens)
    deficit = np.maximum(need + pending + used - capacity, 0.0)
    drain = np.maximum(used, float(request.block_tokens)) / model.residence_s
    queue = deficit / drain
    first = (candidates.tbt_s[sel] if candidates.tbt_s is not None
             else np.full(n, model.tbt_s))
    return Prediction(queue, transfer, first, est.tier, nbytes)
