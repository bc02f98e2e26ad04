"""A peer of the prober's pinglist and what the prober knows of it.

Per peer: RFC 6298 smoothed RTT and RTT variance (``alpha = 1/8``, ``beta = 1/4``), the
retransmission timeout they give, and a sliding window of recent RTTs for min/p50/p99
(:func:`percentile`, nearest rank). :class:`netkv_agent.echo.Prober` fills them in.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

ALPHA = 0.125
BETA = 0.25


@dataclass(frozen=True, slots=True)
class PeerTarget:
    """One entry of the pinglist: whom to probe, where, and how often."""

    name: str
    address: str
    port: int
    interval_s: float


@dataclass(slots=True)
class PeerState:
    """Live statistics for one peer; ``sent``/``lost`` are since the last collected sample."""

    target: PeerTarget
    addr: tuple[str, int]
    window_s: float
    srtt: float | None = None
    rttvar: float = 0.0
    sent: int = 0
    lost: int = 0
    recent: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=4096))  # (clock s, rtt s)
    last_collect: float = field(default_factory=time.monotonic)
    every: int = 1  # probe every this many rounds
    phase: int = 0  # ... in rounds where round % every == phase

    def observe(self, rtt: float, now: float) -> None:
        """Fold one RTT into SRTT/RTTVAR (RFC 6298 section 2) and the window."""
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt
        self.recent.append((now, rtt))
        self.sent += 1

    def expire(self, now: float) -> None:
        horizon = now - self.window_s
        recent = self.recent
        while recent and recent[0][0] < horizon:
            recent.popleft()

    @property
    def rto(self) -> float:
        """RFC 6298 retransmission timeout: SRTT + 4 RTTVAR (1 s before any measurement)."""
        return 1.0 if self.srtt is None else self.srtt + 4 * self.rttvar


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
