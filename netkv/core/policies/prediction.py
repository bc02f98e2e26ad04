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

from netkv.core.oracle import CostOracle, LinkStateOracle
from netkv.core.policies.bookings import Bookings
from netkv.core.policies.paths import path_table
from netkv.core.policies.views import CandidateView, RequestView
from netkv.core.topology import FloatArray, IntArray, Topology
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
    """Predict for all candidates, or only those in ``index`` (baselines report their pick).

    A :class:`~netkv.core.oracle.LinkStateOracle` is evaluated inline over cached path tables
    (same arithmetic as its ``estimate``, without recomputing paths); any other oracle goes
    through the protocol.
    """
    host = candidates.host if index is None else candidates.host[index]
    n = host.shape[0]
    src = request.prefill_host if src_host is None else src_host
    delta = request.delta_tokens(len(candidates))
    if index is not None:
        delta = delta[index]
    nbytes = delta * request.kv_bytes_per_token
    if type(oracle) is LinkStateOracle:
        table = path_table(oracle.topology)
        links_all, tiers_all = table.from_src(src)
        links = links_all[host]
        tier = tiers_all[host]
        rate_ext = np.append(np.maximum(oracle.available_bytes_s, 1.0), np.inf)
        lat_ext = np.append(oracle.latency_s, 0.0)
        transfer = lat_ext[links].sum(axis=1) + nbytes / rate_ext[links].min(axis=1)
        if bookings is not None and bookings.active:
            transfer = transfer + bookings.delay_on(links, nbytes, rate_ext)
    else:
        est = oracle.estimate(src, host, nbytes)
        tier = est.tier
        transfer = est.seconds
        if bookings is not None and bookings.active:
            rates = getattr(oracle, "available_bytes_s", None)
            transfer = transfer + bookings.extra_seconds(src, host, nbytes, rates)
    if index is None:
        capacity = candidates.capacity_tokens
        use = candidates.kv_use
        pend = candidates.waiting_tokens
        tbt = candidates.tbt_s
    else:
        capacity = candidates.capacity_tokens[index]
        use = candidates.kv_use[index]
        pend = None if candidates.waiting_tokens is None else candidates.waiting_tokens[index]
        tbt = None if candidates.tbt_s is None else candidates.tbt_s[index]
    need = float(request.prompt_tokens + request.output_tokens)
    used = use * capacity
    if pend is None:
        waiting = candidates.waiting if index is None else candidates.waiting[index]
        pending: FloatArray = (waiting * need).astype(np.float64)
    else:
        pending = pend
    deficit = np.maximum(need + pending + used - capacity, 0.0)
    if deficit.any():
        queue = deficit / (np.maximum(used, float(request.block_tokens)) / model.residence_s)
    else:
        queue = deficit
    first = tbt if tbt is not None else np.full(n, model.tbt_s)
    return Prediction(queue, transfer, first, tier, nbytes)


def tiers_to(oracle: CostOracle, src: int, hosts: IntArray) -> IntArray:
    """Tier from ``src`` to each host: from the cached path table when the oracle carries its
    topology, else from a zero-byte estimate."""
    topology = getattr(oracle, "topology", None)
    if isinstance(topology, Topology):
        tiers: IntArray = path_table(topology).from_src(src)[1][hosts]
        return tiers
    return oracle.estimate(src, hosts, 0.0).tier
