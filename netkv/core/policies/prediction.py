"""The TTFT predictor every policy reports with and ``netkv`` minimises.

``ttft(d) = queue(d) + transfer(p -> d, bytes d lacks) + first_step(d)``:

* ``queue`` is the wait for KV memory at the decoder: the tokens this request needs (prompt
  plus reserved output) beyond what is free after the admission queue, drained at the rate
  running requests release memory (``used / residence_s``);
* ``transfer`` is the cost oracle's estimate for the bytes the decoder does not already hold,
  plus the delay of the booked transfers it shares its worst link with (see ``bookings``;
  per-link rates come from the oracle when it exposes ``available_bytes_s``, as
  :class:`~netkv.core.costmodel.LinkStateOracle` does, else from link capacities);
* ``first_step`` is the decoder's current time per output token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from netkv.core.congestion import CachedMapView
from netkv.core.costmodel import CostOracle, LinkStateOracle
from netkv.core.paths import CachedOracle, PathTable, path_table
from netkv.core.policies.bookings import Bookings
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

    A :class:`~netkv.core.costmodel.LinkStateOracle` is evaluated inline over cached path
    tables (same arithmetic as its ``estimate``, without recomputing paths); so is a caching
    oracle (:class:`~netkv.core.paths.CachedOracle`,
    :class:`~netkv.core.congestion.CachedMapView`: its per-source row, gathered for the
    candidates once per view); any other oracle goes through the protocol. Over all
    candidates, what depends on the candidates' hosts alone is kept in ``candidates.cache``.
    Every route gives the same numbers bit for bit.
    """
    host = candidates.host if index is None else candidates.host[index]
    src = request.prefill_host if src_host is None else src_host
    queue, first, nbytes = decode_side(model, request, candidates, index)
    if index is not None:
        transfer, tier = transfer_times(oracle, bookings, src, host, nbytes)
    elif type(oracle) is CachedMapView or type(oracle) is CachedOracle:
        transfer, tier = _row_transfer(oracle, bookings, src, candidates, nbytes)
    elif type(oracle) is LinkStateOracle and host.shape[0] <= _CHUNK:
        transfer, tier = _link_state_transfer(oracle, bookings, src, host, nbytes,
                                              candidates=candidates)
    else:
        transfer, tier = transfer_times(oracle, bookings, src, host, nbytes)
    dst_nic = candidates.nic_bytes_s
    if dst_nic is not None and index is not None:
        dst_nic = dst_nic[index]
    if bookings is not None and (candidates.nic_booked_bytes is not None
                                 or request.src_nic_booked_flows > 0):
        transfer = nic_bound_booked(transfer, tier, nbytes, request=request,
                                    candidates=candidates, dst_nic=dst_nic, index=index)
    else:
        transfer = nic_bound(transfer, tier, nbytes, request.src_nic_bytes_s, dst_nic)
    if request.stream_layers > 0:
        transfer = exposed(transfer, request.prefill_compute_s, request.stream_layers)
    return Prediction(queue, transfer, first, tier, nbytes)


def nic_bound(transfer_s: FloatArray, tier: IntArray, nbytes: FloatArray,
              src_nic: FloatArray | float, dst_nic: FloatArray | None) -> FloatArray:
    """A transfer off the source host is at least ``bytes / min(source NICs, destination
    NICs)`` when the instances are bound to part of their hosts' NICs (0 / None: unknown)."""
    if dst_nic is None and isinstance(src_nic, float | int) and not src_nic > 0:
        return transfer_s  # the common case, without numpy calls
    src = np.asarray(src_nic, dtype=np.float64)
    if dst_nic is None and not np.any(src > 0):
        return transfer_s
    rate = np.where(src > 0, src, np.inf)
    if dst_nic is not None:
        rate = np.minimum(rate, np.where(dst_nic > 0, dst_nic, np.inf))
    floor = np.where(tier > 0, nbytes / rate, 0.0)
    out: FloatArray = np.maximum(transfer_s, floor)
    return out


def nic_bound_booked(transfer_s: FloatArray, tier: IntArray, nbytes: FloatArray, *,
                     request: RequestView, candidates: CandidateView,
                     dst_nic: FloatArray | None, index: IntArray | None) -> FloatArray:
    """:func:`nic_bound` with the booked transfers that share the bound NICs: the bytes of
    the source instance's and of each decoder's booked transfers compete with this one on
    those NICs, so a side's floor is ``(bytes + competing) / rate`` with ``competing =
    min(booked bytes, booked flows x bytes)`` (the bookings' bound under max-min sharing,
    see :mod:`~netkv.core.policies.bookings`)."""
    out = transfer_s
    off = tier > 0
    src_rate = request.src_nic_bytes_s
    if src_rate > 0:
        competing = np.minimum(request.src_nic_booked_bytes,
                               request.src_nic_booked_flows * nbytes)
        out = np.maximum(out, np.where(off, (nbytes + competing) / src_rate, 0.0))
    if dst_nic is not None:
        booked, flows = candidates.nic_booked_bytes, candidates.nic_booked_flows
        rate = np.where(dst_nic > 0, dst_nic, np.inf)
        if booked is not None and flows is not None:
            if index is not None:
                booked, flows = booked[index], flows[index]
            competing = np.minimum(booked, flows * nbytes)
            out = np.maximum(out, np.where(off, (nbytes + competing) / rate, 0.0))
        else:
            out = np.maximum(out, np.where(off, nbytes / rate, 0.0))
    result: FloatArray = out
    return result


def exposed(transfer_s: FloatArray, compute_s: FloatArray | float, layers: int) -> FloatArray:
    """The part of a layer-wise streamed transfer that prefill cannot hide, vectorised
    (:func:`netkv.core.policies.timing.layerwise_exposed_s`)."""
    out: FloatArray = np.maximum(transfer_s / layers,
                                 transfer_s - np.asarray(compute_s) * (layers - 1) / layers)
    return out


def decode_side(model: DecodeModel, request: RequestView, candidates: CandidateView,
                index: IntArray | None = None) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``(queue_s, first_token_s, transfer_bytes)`` per candidate: everything but the path."""
    n = len(candidates) if index is None else index.shape[0]
    if request.overlap_blocks is None:
        nbytes: FloatArray = np.full(n, request.prompt_tokens * request.kv_bytes_per_token)
    else:
        overlap = request.overlap_blocks if index is None else request.overlap_blocks[index]
        missing = np.maximum(request.prompt_tokens - overlap * request.block_tokens, 0)
        nbytes = missing * request.kv_bytes_per_token
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
        scaled: Any = waiting * need  # float64 already for the usual int64 counts
        pending: FloatArray = (scaled if scaled.dtype == np.float64
                               else scaled.astype(np.float64))
    else:
        pending = pend
    deficit = np.maximum(need + pending + used - capacity, 0.0)
    if np.count_nonzero(deficit):
        queue = deficit / (np.maximum(used, float(request.block_tokens)) / model.residence_s)
    else:
        queue = deficit
    if tbt is not None:
        first = tbt
    elif index is None:  # the same constant for every decision over this view
        first = _cached(candidates, ("tbt", model.tbt_s),
                        lambda: _readonly(np.full(n, model.tbt_s)))
    else:
        first = np.full(n, model.tbt_s)
    return queue, first, nbytes


def transfer_matrix(oracle: CostOracle, bookings: Bookings | None, srcs: IntArray,
                    host: IntArray, nbytes: FloatArray) -> tuple[FloatArray, IntArray]:
    """:func:`transfer_times` from each of ``srcs`` (distinct hosts): ``(S, n)`` arrays.
    Vectorised over sources for a :class:`~netkv.core.costmodel.LinkStateOracle`."""
    if type(oracle) is not LinkStateOracle:
        pairs = [transfer_times(oracle, bookings, int(s), host, nbytes) for s in srcs]
        return np.stack([t for t, _ in pairs]), np.stack([k for _, k in pairs])
    links_all, on_path_all, tiers_all = path_table(oracle.topology).stacked(srcs)
    n = host.shape[0]
    transfer = np.empty((srcs.shape[0], n), dtype=np.float64)
    step = max(_CHUNK // max(n, 1), 1)  # sources per pass, temporaries under 128 KiB
    for lo in range(0, srcs.shape[0], step):
        hi = min(lo + step, srcs.shape[0])
        links = np.take(links_all[lo:hi], host, axis=2)
        rate = oracle.available_bytes_s[links]
        latency = (oracle.latency_s[links] * np.take(on_path_all[lo:hi], host, axis=2)).sum(
            axis=1)
        part = latency + nbytes / np.maximum(rate.min(axis=1), 1.0)
        if bookings is not None and bookings.active:
            flows = bookings.flows_ext[links]
            if flows.any():
                competing = np.minimum(bookings.bytes_ext[links], flows * nbytes)
                part = part + (competing / np.maximum(rate, 1.0)).max(axis=1)
        transfer[lo:hi] = part
    tiers: IntArray = np.take(tiers_all, host, axis=1)
    return transfer, tiers


def transfer_times(oracle: CostOracle, bookings: Bookings | None, src: int, host: IntArray,
                   nbytes: FloatArray) -> tuple[FloatArray, IntArray]:
    """Predicted transfer seconds (oracle plus own bookings) and tiers from ``src``."""
    if type(oracle) is LinkStateOracle:
        return _link_state_transfer(oracle, bookings, src, host, nbytes)
    est = oracle.estimate(src, host, nbytes)
    transfer = est.seconds
    if bookings is not None and bookings.active:
        rates = getattr(oracle, "available_bytes_s", None)  # a LinkStateOracle's per-link view
        transfer = transfer + bookings.extra_seconds(src, host, nbytes, rates)
    return transfer, est.tier


def tiers_to(oracle: CostOracle, src: int, hosts: IntArray) -> IntArray:
    """Tier from ``src`` to each host: from the cached path table when the oracle carries its
    topology, else from a zero-byte estimate."""
    topology = getattr(oracle, "topology", None)
    if isinstance(topology, Topology):
        tiers: IntArray = path_table(topology).from_src(src).tiers[hosts]
        return tiers
    return oracle.estimate(src, hosts, 0.0).tier


# Candidates per pass: keeps each (6, chunk) float64 temporary under 128 KiB, glibc's default
# mmap threshold; bigger temporaries are mmapped and page-faulted afresh on every call, which
# made |D| = 4096 ten times slower than 2 x 2048.
_CHUNK = 2048


def _link_state_transfer(oracle: LinkStateOracle, bookings: Bookings | None, src: int,
                         host: IntArray, nbytes: FloatArray, *,
                         candidates: CandidateView | None = None
                         ) -> tuple[FloatArray, IntArray]:
    """``LinkStateOracle.estimate`` plus the bookings' delay, over cached path tables: a few
    gathers and reductions over ``(6, |D|)``, with no per-link (O(links)) work per call.
    ``candidates`` (whose hosts are ``host``, at most ``_CHUNK``): the gathered paths come
    from its cache."""
    table = path_table(oracle.topology)
    n = host.shape[0]
    if candidates is not None:
        links, on_path, tiers = candidate_paths(table, src, candidates)
        if 6 * n < oracle.latency_s.shape[0]:
            latency = np.add.reduce(oracle.latency_s[links] * on_path, axis=0)
        else:
            latency = table.from_src(src).path_latency(oracle.latency_s)[host]
        return latency + _transfer_part(oracle, bookings, links, nbytes), tiers
    paths = table.from_src(src)
    if 6 * n < oracle.latency_s.shape[0]:  # few candidates: sum their path latencies directly
        links = np.take(paths.links, host, axis=1)
        latency = np.add.reduce(oracle.latency_s[links] * np.take(paths.on_path, host, axis=1),
                                axis=0)
        return latency + _transfer_part(oracle, bookings, links, nbytes), paths.tiers[host]
    latency = paths.path_latency(oracle.latency_s)[host]
    if n <= _CHUNK:
        links = np.take(paths.links, host, axis=1)
        return latency + _transfer_part(oracle, bookings, links, nbytes), paths.tiers[host]
    transfer = np.empty(n, dtype=np.float64)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        links = np.take(paths.links, host[lo:hi], axis=1)
        transfer[lo:hi] = latency[lo:hi] + _transfer_part(oracle, bookings, links,
                                                          nbytes[lo:hi])
    return transfer, paths.tiers[host]


def _transfer_part(oracle: LinkStateOracle, bookings: Bookings | None, links: IntArray,
                   nbytes: FloatArray) -> FloatArray:
    """Seconds beyond latency for ``links`` (6, k), gathered C-contiguous with ``np.take``
    (``table[:, host]`` is column-major and makes the axis-0 reductions slow)."""
    # ufunc.reduce and count_nonzero: the ndarray methods (min, max, any) add ~1 µs of
    # Python-level dispatch each, a third of a small decision's budget.
    rate = np.maximum(oracle.available_bytes_s[links], 1.0)
    transfer: FloatArray = nbytes / np.minimum.reduce(rate, axis=0)
    if bookings is not None and bookings.active:
        flows = bookings.flows_ext[links]
        if np.count_nonzero(flows):
            competing = np.minimum(bookings.bytes_ext[links], flows * nbytes)
            transfer = transfer + np.maximum.reduce(competing / rate, axis=0)
    return transfer


# -- what depends on the candidates' hosts alone, kept on the view --------------------------
def _readonly(arr: Any) -> Any:
    """``arr``, made read-only: a cached array is shared by every decision over a view."""
    arr.flags.writeable = False
    return arr


def _cache_limit(candidates: CandidateView) -> int:
    """Entries a view's cache may hold: about 64 K candidates' worth in all (every source of
    a |D| = 64 view, 32 sources of a |D| = 2048 one)."""
    return max(8, 65536 // max(len(candidates), 1))


def _cached(candidates: CandidateView, key: Any, make: Any) -> Any:
    """``candidates.cache[key]``, made by ``make()`` on a miss."""
    hit = candidates.cache.get(key)
    if hit is None:
        hit = _store(candidates, key, make())
    return hit


def _store(candidates: CandidateView, key: Any, value: Any) -> Any:
    cache = candidates.cache
    if key not in cache and len(cache) >= _cache_limit(candidates):
        cache.clear()
    cache[key] = value
    return value


def candidate_paths(table: PathTable, src: int, candidates: CandidateView
                    ) -> tuple[IntArray, FloatArray, IntArray]:
    """``(links, on_path, tiers)`` of ``src``'s paths in ``table`` to the candidates' hosts,
    i.e. ``np.take(table.from_src(src).links, candidates.host, axis=1)`` and so on, gathered
    once per view, table and source (read-only)."""
    key = ("paths", src)
    hit = candidates.cache.get(key)
    if hit is None or hit[0] is not table:
        paths = table.from_src(src)
        host = candidates.host
        hit = _store(candidates, key, (table, _readonly(np.take(paths.links, host, axis=1)),
                                       _readonly(np.take(paths.on_path, host, axis=1)),
                                       _readonly(paths.tiers[host])))
    return hit[1], hit[2], hit[3]


def _row_transfer(oracle: CachedMapView | CachedOracle, bookings: Bookings | None, src: int,
                  candidates: CandidateView, nbytes: FloatArray) -> tuple[FloatArray, IntArray]:
    """:func:`transfer_times` for an oracle answering from per-source rows (its ``estimate``
    is :func:`~netkv.core.paths.pick` of ``row(src)``), with the row gathered for the
    candidates once per row and view: the same arithmetic, without the per-call gathers."""
    row = oracle.row(src)
    key = ("row", src)
    hit = candidates.cache.get(key)
    if hit is None or hit[0] is not row:  # a new row (the map view was refreshed)
        host = candidates.host
        hit = _store(candidates, key, (row, _readonly(row.latency_s[host]),
                                       _readonly(row.bandwidth_bytes_s[host]),
                                       _readonly(row.tier[host]), [None]))
    latency, bandwidth, tier = hit[1], hit[2], hit[3]
    transfer: FloatArray = latency + np.asarray(nbytes, dtype=np.float64) / bandwidth
    if bookings is not None and bookings.active:  # Bookings.extra_seconds, links cached
        links = candidate_paths(bookings.paths, src, candidates)[0]
        # np.maximum(rate[links], 1.0), kept beside the row: a map view's per-link rates are
        # a new array when the view is refreshed and are not written in place.
        rate, kept = oracle.available_bytes_s, hit[4]
        if kept[0] is None or kept[0][0] is not rate or kept[0][1] is not links:
            kept[0] = (rate, links, _readonly(np.maximum(rate[links], 1.0)))
        competing = np.minimum(bookings.bytes_ext[links], bookings.flows_ext[links] * nbytes)
        transfer = transfer + np.maximum.reduce(competing / kept[0][2], axis=0)
    return transfer, tier
