"""The wrapper that owns what a policy must not: timing, counting and its bookings.

Services and the simulator call :meth:`DecisionEngine.decide`; the policy stays a pure
function of its inputs. Durations go into a preallocated ring so the hot path never grows
a list; :meth:`percentiles_us` summarises them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from netkv.core.costmodel import CostOracle
from netkv.core.policies.base import DecodePolicy
from netkv.core.policies.bookings import Booking, Bookings
from netkv.core.policies.registry import make_policy
from netkv.core.policies.views import CandidateView, Decision, RequestView
from netkv.core.topology import FloatArray, Topology


class DecisionEngine:
    """A named policy plus its bookings and decision-time record."""

    def __init__(self, policy: DecodePolicy, topology: Topology, *,
                 history: int = 1 << 16, bookings: Bookings | None = None) -> None:
        """``bookings``: a ledger shared with other engines (a scheduler running several
        policies books every transfer once); a fresh one when omitted."""
        self.policy = policy
        if bookings is not None and bookings.topology is not topology:
            raise ValueError("bookings belong to another topology")
        self.bookings = Bookings(topology) if bookings is None else bookings
        self.durations_s: FloatArray = np.zeros(history, dtype=np.float64)
        self.count = 0
        self.last_duration_s = 0.0

    @classmethod
    def from_name(cls, name: str, params: Mapping[str, Any] | None,
                  topology: Topology, *, bookings: Bookings | None = None) -> DecisionEngine:
        return cls(make_policy(name, params), topology, bookings=bookings)

    def decide(self, request: RequestView, candidates: CandidateView,
               oracle: CostOracle) -> Decision:
        start = time.perf_counter_ns()
        decision = self.policy.decide(request, candidates, oracle, self.bookings)
        self.record((time.perf_counter_ns() - start) * 1e-9)
        return decision

    def record(self, elapsed_s: float) -> None:
        """Count one decision that took ``elapsed_s`` (also for a caller that evaluated this
        engine's policy itself: a router's fused evaluation of the same formula)."""
        self.durations_s[self.count % self.durations_s.shape[0]] = elapsed_s
        self.count += 1
        self.last_duration_s = elapsed_s

    def reserve(self, src_host: int, dst_host: int, nbytes: float) -> Booking:
        """Book a transfer the caller has started (call :meth:`release` when it lands)."""
        return self.bookings.reserve(src_host, dst_host, nbytes)

    def release(self, booking: Booking) -> None:
        self.bookings.release(booking)

    def recorded(self) -> FloatArray:
        out: FloatArray = self.durations_s[: min(self.count, self.durations_s.shape[0])]
        return out

    def percentiles_us(self, qs: tuple[float, ...] = (50.0, 99.0)) -> dict[float, float]:
        data = self.recorded()
        if data.size == 0:
            return {q: float("nan") for q in qs}
        values = np.percentile(data, qs) * 1e6
        return {q: float(v) for q, v in zip(qs, values, strict=True)}
