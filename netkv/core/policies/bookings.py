"""Transfers a scheduler has itself started: bytes and counts per directed link.

The congestion map shows traffic only after a telemetry round trip; a burst of decisions made
inside that window would otherwise all pick the one decoder behind the best path (herding).
Every booked transfer therefore counts against the links of its path until it is released.
Under max-min fair sharing a new flow of ``b`` bytes finishes after about
``(b + sum_i min(o_i, b)) / C`` on a link of rate ``C`` carrying other flows of ``o_i``
bytes; with only per-link totals we bound ``sum_i min(o_i, b)`` by
``min(booked_bytes, n_flows * b)``, and the added delay of a path is that of its worst link
(``max_l competing_l / rate_l``). Booked bytes are the sizes at booking time (an upper bound
on what is left).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from netkv.core.paths import path_table
from netkv.core.topology import FloatArray, IntArray, Topology


@dataclass(slots=True)
class Booking:
    """A reserved transfer; hand it back to :meth:`Bookings.release` when it completes (never
    changed once made; not frozen: a frozen init costs about half a microsecond per booking)."""

    links: tuple[int, ...]
    nbytes: float


_MAX_ROUTES = 1 << 16  # (source, destination) pairs whose path is kept


class Bookings:
    """Own in-flight KV transfers per directed link of ``topology``.

    ``bytes_ext``/``flows_ext`` carry one spare, always-zero entry past the last link.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.paths = path_table(topology)
        self.bytes_ext = np.zeros(topology.n_links + 1, dtype=np.float64)
        self.flows_ext = np.zeros(topology.n_links + 1, dtype=np.float64)
        # The same memory, element by element as Python floats: a memoryview's item access
        # costs about half of an ndarray's (booking and release touch a few links each); a
        # C reader (the fused kernel) takes its buffer for a tenth of an ndarray's export.
        self.bytes_items = self.bytes_ext.data.cast("B").cast("d")
        self.flows_items = self.flows_ext.data.cast("B").cast("d")
        self.active = 0
        # Each (source, destination)'s path once: its links and their index array.
        self._routes: dict[tuple[int, int], tuple[int, ...]] = {}
        self._index: dict[tuple[int, ...], IntArray] = {}

    @property
    def bytes(self) -> FloatArray:
        """Booked bytes per link."""
        out: FloatArray = self.bytes_ext[:-1]
        return out

    @property
    def flows(self) -> FloatArray:
        """Booked transfers per link."""
        out: FloatArray = self.flows_ext[:-1]
        return out

    def route(self, src_host: int, dst_host: int) -> tuple[int, ...]:
        """The links of the path from ``src_host`` to ``dst_host`` (``Topology.path``, read
        from the cached path table once per pair)."""
        links = self._routes.get((src_host, dst_host))
        if links is None:
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.clear()
                self._index.clear()
            paths = self.paths.from_src(src_host)
            idx: list[int] = paths.links[:, dst_host][paths.on_path[:, dst_host] > 0].tolist()
            links = self._routes[src_host, dst_host] = tuple(idx)
            self._index[links] = np.array(idx, dtype=np.int64)
        return links

    def reserve(self, src_host: int, dst_host: int, nbytes: float) -> Booking:
        """Count a started transfer against the links of its path."""
        links = self._routes.get((src_host, dst_host))  # route(), its cached case inline
        booking = Booking(self.route(src_host, dst_host) if links is None else links,
                          float(nbytes))
        # Element by element over the path's few links (a path holds each link once): the
        # same float64 additions as ``bytes_ext[idx] += nbytes`` without three array calls.
        nb, booked, flows = booking.nbytes, self.bytes_items, self.flows_items
        for link in booking.links:
            booked[link] += nb
            flows[link] += 1.0
        self.active += 1
        return booking

    def release(self, booking: Booking) -> None:
        # max(x - nbytes, 0.0) per link, as np.maximum computes it (no NaN or -0.0 occurs:
        # the counts start at +0.0 and only add or subtract non-negative finite amounts)
        nb, booked, flows = booking.nbytes, self.bytes_items, self.flows_items
        for link in booking.links:
            left = booked[link] - nb
            booked[link] = left if left > 0.0 else 0.0
            count = flows[link] - 1.0
            flows[link] = count if count > 0.0 else 0.0
        if self.active > 0:
            self.active -= 1

    def extra_seconds(self, src_host: int, dst_hosts: IntArray, nbytes: FloatArray,
                      link_rate: FloatArray | None = None) -> FloatArray:
        """Per destination: the delay booked transfers add to a new one of ``nbytes``, on the
        worst link of its path. ``link_rate`` is the per-link rate left for KV traffic (the
        oracle's view); the links' capacities without it."""
        if self.active == 0:
            return np.zeros(dst_hosts.shape[0], dtype=np.float64)
        rate = self.topology.capacity if link_rate is None else link_rate
        links = np.take(self.paths.from_src(src_host).links, dst_hosts, axis=1)
        competing = np.minimum(self.bytes_ext[links], self.flows_ext[links] * nbytes)
        out: FloatArray = (competing / np.maximum(rate[links], 1.0)).max(axis=0)
        return out
