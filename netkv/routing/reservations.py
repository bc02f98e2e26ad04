"""Bookings of what the scheduler decided, so a burst does not herd onto one decoder.

Every ``select`` with ``reserve`` books the chosen decoder until the router calls
``POST /v1/release`` (the request finished or failed) or the booking expires: a lost release
must not leak load forever. While open, a booking counts as a waiting request on its decoder;
the KV transfer it starts counts against the links of its path (the policy engine's
``Bookings``) until its predicted end. So the next decision sees both, inside the telemetry
round trip that would otherwise hide them (Dynamo's ``select_and_reserve``, AIBrix's
pending-decode tracker).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from netkv.core.topology import IntArray

B = TypeVar("B")


@dataclass(slots=True)
class Reservation(Generic[B]):
    """One booked decision; ``transfer`` is the path booking while the KV is on the wire."""

    request_id: str
    decode: int  # index into the registry's decoders
    created: float
    transfer_end: float  # predicted end of the KV transfer (unix s)
    expires: float
    transfer: B | None


class Reservations(Generic[B]):
    """Open bookings by request id, per-decoder counts, and lazy expiry (two heaps)."""

    def __init__(self, n_decoders: int, ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.open: dict[str, Reservation[B]] = {}
        self.pending: IntArray = np.zeros(n_decoders, dtype=np.int64)
        self._expiry: list[tuple[float, str]] = []
        self._transfers: list[tuple[float, str]] = []
        self.expired_total = 0
        self.released_total = 0

    def resize(self, n_decoders: int) -> None:
        """Grow with the decoder set (decoders are only ever added)."""
        extra = n_decoders - self.pending.shape[0]
        if extra > 0:
            self.pending = np.concatenate([self.pending, np.zeros(extra, dtype=np.int64)])

    def remap(self, mapping: IntArray) -> list[B]:
        """Follow a compaction of the decoder set (``mapping[old] = new``, -1: removed);
        bookings of removed decoders end. Returns their transfers to hand back."""
        done: list[B] = []
        pending = np.zeros(int((mapping >= 0).sum()), dtype=np.int64)
        for request_id, res in list(self.open.items()):
            new = int(mapping[res.decode]) if res.decode < len(mapping) else -1
            if new < 0:
                del self.open[request_id]
                if res.transfer is not None:
                    done.append(res.transfer)
                    res.transfer = None
                continue
            res.decode = new
            pending[new] += 1
        self.pending = pending
        return done

    def book(self, request_id: str, decode: int, transfer_s: float,
             transfer: B | None) -> tuple[Reservation[B], Reservation[B] | None]:
        """Book ``decode`` for ``request_id``. Re-booking an open id replaces it (a retried
        select must not count twice); the replaced reservation is returned so its transfer
        booking can be handed back."""
        now = self.clock()
        old = self._drop(request_id)
        res = Reservation(request_id, decode, now, now + max(transfer_s, 0.0),
                          now + self.ttl_s, transfer)
        self.open[request_id] = res
        self.pending[decode] += 1
        heapq.heappush(self._expiry, (res.expires, request_id))
        if transfer is not None:
            heapq.heappush(self._transfers, (res.transfer_end, request_id))
        return res, old

    def release(self, request_id: str) -> Reservation[B] | None:
        res = self._drop(request_id)
        if res is not None:
            self.released_total += 1
        return res

    def _drop(self, request_id: str) -> Reservation[B] | None:
        res = self.open.pop(request_id, None)
        if res is not None and self.pending[res.decode] > 0:
            self.pending[res.decode] -= 1
        return res

    def sweep(self, now: float | None = None) -> list[B]:
        """Expire old bookings and end transfers past their predicted end.

        Returns the transfer bookings to hand back. O((ended + expired) log n).
        """
        now = self.clock() if now is None else now
        done: list[B] = []
        while self._transfers and self._transfers[0][0] <= now:
            end, request_id = heapq.heappop(self._transfers)
            res = self.open.get(request_id)
            if res is not None and res.transfer_end == end and res.transfer is not None:
                done.append(res.transfer)
                res.transfer = None
        while self._expiry and self._expiry[0][0] <= now:
            expires, request_id = heapq.heappop(self._expiry)
            res = self.open.get(request_id)
            if res is not None and res.expires == expires:
                self._drop(request_id)
                self.expired_total += 1
                if res.transfer is not None:
                    done.append(res.transfer)
                    res.transfer = None
        for name in ("_expiry", "_transfers"):
            heap = getattr(self, name)
            if len(heap) > 4 * len(self.open) + 1024:  # entries left by releases: compact
                live = [(e, r) for e, r in heap if r in self.open]
                heapq.heapify(live)
                setattr(self, name, live)
        return done
