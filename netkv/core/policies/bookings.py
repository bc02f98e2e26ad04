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

from netkv.core.topology import FloatArray, IntArray, Topology


@dataclass(frozen=True, slots=True)
class Booking:
    """A reserved transfer; hand it back to :meth:`Bookings.release` when it completes."""

    links: tuple[int, ...]
    nbytes: float


class Bookings:
    """Own in-flight KV transfers per directed link of ``topology``."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.bytes = np.zeros(topology.n_links, dtype=np.float64)
        self.flows = np.zeros(topology.n_links, dtype=np.float64)
        self.active = 0

    def reserve(self, src_host: int, dst_host: int, nbytes: float) -> Booking:
        links = self.topology.path(src_host, dst_host)
        booking = Booking(links, float(nbytes))
        idx = list(links)
        self.bytes[idx] += booking.nbytes
        self.flows[idx] += 1.0
        self.active += 1
        return booking

    def release(self, booking: Booking) -> None:
        idx = list(booking.links)
        self.bytes[idx] = np.maximum(self.bytes[idx] - booking.nbytes, 0.0)
        self.flows[idx] = np.maximum(self.flows[idx] - 1.0, 0.0)
        self.active = max(self.active - 1, 0)

    def extra_seconds(self, src_host: int, dst_hosts: IntArray, nbytes: FloatArray,
                      link_rate: FloatArray | None = None) -> FloatArray:
        """Per destination: the delay booked transfers add to a new one of ``nbytes``, on the
        worst link of its path. ``link_rate`` is the per-link rate left for KV traffic (the
        oracle's view); the links' capacities without it."""
        if self.active == 0:
            return np.zeros(dst_hosts.shape[0], dtype=np.float64)
        rate = self.topology.capacity if link_rate is None else link_rate
        _, links, mask = self.topology.path_matrix(src_host, dst_hosts)
        competing = np.minimum(self.bytes[links], self.flows[links] * nbytes[:, None])
        delay = competing / np.maximum(rate[links], 1.0)
        out: FloatArray = np.where(mask, delay, 0.0).max(axis=1)
        return out
