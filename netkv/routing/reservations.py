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
from collections import deque
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
    """Open bookings by request id, per-decoder counts, and lazy expiry.

    Every booking lasts the same ``ttl_s``, so expiries arrive in the clock's order: they
    queue in a deque, first in first out (a heap's pop would sift through a dozen levels of
    cold entries per booking). One made while the clock stood behind the queue's newest (it
    stepped back) waits in a small heap beside it. Transfers end at varying times: a heap.
    """

    def __init__(self, n_decoders: int, ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.open: dict[str, Reservation[B]] = {}
        self.pending: IntArray = np.zeros(n_decoders, dtype=np.int64)
        self._counts = _items(self.pending)
        self._expiry: deque[tuple[float, str]] = deque()  # in order of expiry
        self._late: list[tuple[float, str]] = []  # a heap: those booked out of that order
        self._transfers: list[tuple[float, str]] = []
        self.expired_total = 0
        self.released_total = 0

    def resize(self, n_decoders: int) -> None:
        """Grow with the decoder set (decoders are only ever added)."""
        extra = n_decoders - self.pending.shape[0]
        if extra > 0:
            self.pending = np.concatenate([self.pending, np.zeros(extra, dtype=np.int64)])
            self._counts = _items(self.pending)

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
        self._counts = _items(pending)
        return done

    def book(self, request_id: str, decode: int, transfer_s: float,
             transfer: B | None) -> tuple[Reservation[B], Reservation[B] | None]:
        """Book ``decode`` for ``request_id``. Re-booking an open id replaces it (a retried
        select must not count twice); the replaced reservation is returned so its transfer
        booking can be handed back."""
        now = self.clock()
        old = self._drop(request_id)
        expires = now + self.ttl_s
        res = Reservation(request_id, decode, now, now + max(transfer_s, 0.0), expires,
                          transfer)
        self.open[request_id] = res
        self._counts[decode] += 1
        queue = self._expiry
        if not queue or expires >= queue[-1][0]:
            queue.append((expires, request_id))
        else:
            heapq.heappush(self._late, (expires, request_id))
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
        if res is not None:
            counts = self._counts
            if counts[res.decode] > 0:
                counts[res.decode] -= 1
        return res

    def sweep(self, now: float | None = None) -> list[B]:
        """Expire old bookings and end transfers past their predicted end.

        Returns the transfer bookings to hand back. O(ended log n + expired).
        """
        now = self.clock() if now is None else now
        done: list[B] = []
        transfers, expiry, open_, counts = self._transfers, self._expiry, self.open, self._counts
        while transfers and transfers[0][0] <= now:
            end, request_id = heapq.heappop(transfers)
            res = open_.get(request_id)
            if res is not None and res.transfer_end == end and res.transfer is not None:
                done.append(res.transfer)
                res.transfer = None
        late = self._late
        while True:
            if expiry and expiry[0][0] <= now:
                expires, request_id = expiry.popleft()
            elif late and late[0][0] <= now:
                expires, request_id = heapq.heappop(late)
            else:
                break
            res = open_.get(request_id)
            if res is not None and res.expires == expires:
                del open_[request_id]  # _drop, inline: about a hundred of these per sweep
                if counts[res.decode] > 0:
                    counts[res.decode] -= 1
                self.expired_total += 1
                if res.transfer is not None:
                    done.append(res.transfer)
                    res.transfer = None
        # entries left by releases: compact (the deque keeps its order, the heaps are remade)
        limit = 4 * len(open_) + 1024
        if len(expiry) + len(late) > limit:
            self._expiry = deque(item for item in expiry if item[1] in open_)
            self._late = self._live(late)
        if len(transfers) > limit:
            self._transfers = self._live(transfers)
        return done

    def _live(self, heap: list[tuple[float, str]]) -> list[tuple[float, str]]:
        live = [item for item in heap if item[1] in self.open]
        heapq.heapify(live)
        return live


def _items(counts: IntArray) -> memoryview:
    """``counts`` item by item as Python ints (the same memory): a memoryview's item access
    costs about half of an ndarray's, and every booking adds and removes one."""
    return counts.data.cast("B").cast("q")
