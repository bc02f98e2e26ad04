"""Turning monotonically increasing hardware counters into per-second rates, safely.

Counters are read twice and differenced; three things can make the raw difference lie:

* a **wrap**: a fixed-width counter passed its maximum and restarted near zero. When the
  previous value was in the top quarter of the counter's range and the new one in the bottom
  quarter, the true delta is ``new + 2**bits - old``.
* a **reset**: the driver was reloaded or the counters cleared, so the new value is smaller for
  any other reason. That interval's rate is unknown; like Prometheus ``rate()`` we drop it,
  count the reset, and re-baseline on the new value.
* **saturation**: 32-bit IBTA PortCounters stop at ``2**32 - 1`` instead of wrapping. A value
  stuck at the maximum gives no rate (counted as saturated).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def counter_delta(previous: int, current: int, bits: int = 64) -> int | None:
    """The increase from ``previous`` to ``current`` for a ``bits``-wide counter, or ``None``
    when the counter was reset (the interval's rate is unknown)."""
    if current >= previous:
        return current - previous
    span = 1 << bits
    if previous >= span - span // 4 and current < span // 4:
        return current + span - previous
    return None


@dataclass(slots=True)
class RateTracker:
    """Keeps the last reading of a set of named counters and turns the next one into rates.

    ``bits`` gives each counter's width (64 by default). ``resets`` and ``wraps`` count events
    so that the agent can expose them.
    """

    bits: dict[str, int] = field(default_factory=dict)
    resets: int = 0
    wraps: int = 0
    saturated: int = 0
    _last: dict[str, int] | None = None
    _last_t: float = 0.0

    def update(self, values: dict[str, int], now: float) -> tuple[dict[str, float], float] | None:
        """Feed a reading taken at monotonic time ``now``; returns ``(rates, window_s)`` or
        ``None`` for the first reading and for intervals spoiled by a reset."""
        last, last_t = self._last, self._last_t
        self._last, self._last_t = dict(values), now
        if last is None or now <= last_t:
            return None
        window = now - last_t
        rates: dict[str, float] = {}
        spoiled = False
        for name, value in values.items():
            if name not in last:
                spoiled = True
                continue
            bits = self.bits.get(name, 64)
            prev = last[name]
            if bits == 32 and value == prev == (1 << 32) - 1:
                self.saturated += 1
                spoiled = True
                continue
            delta = counter_delta(prev, value, bits)
            if delta is None:
                self.resets += 1
                spoiled = True
                continue
            if value < prev:
                self.wraps += 1
            rates[name] = delta / window
        if spoiled:
            return None
        return rates, window
