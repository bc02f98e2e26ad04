"""The simulator's event queue: a heap of ``(time, sequence, kind, a, b)``.

The sequence number makes the order total and deterministic: events at the same time run in
the order they were pushed.
"""

from __future__ import annotations

import enum
import heapq


class Kind(enum.IntEnum):
    """What an event is; ``a`` and ``b`` are its two integer arguments."""

    ARRIVAL = 0  # a = request
    PREFILL_DONE = 1  # a = prefill instance, b = request
    FLOW = 2  # a = fabric version the completion estimate belongs to
    DECODE = 3  # a = decoder, b = decoder version
    BACKGROUND = 4  # a = inelastic hot spot, b = +1 start / -1 end
    HANDOVER = 5  # a = request: the fixed handover cost has elapsed, bytes may flow
    FAULT = 6  # a = fault episode, b = +1 start / -1 end
    TENANT = 7  # a = tenant episode, b = +1 start / -1 end
    WEIGHTS = 8  # a = instance restart: its weights load
    SAMPLE = 9  # a = telemetry sample number


class EventQueue:
    """A min-heap of events with a stable order for equal times."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._seq = 0

    def push(self, t: float, kind: Kind, a: int, b: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, int(kind), a, b))

    def pop(self) -> tuple[float, int, int, int]:
        t, _, kind, a, b = heapq.heappop(self._heap)
        return t, kind, a, b

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __len__(self) -> int:
        return len(self._heap)
