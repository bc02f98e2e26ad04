"""Stalls of the proxy's one thread, measured where they happen: how late the event loop
wakes a timer (``netkv_proxy_loop_lag_seconds``) and how long each garbage-collector pass
takes (``netkv_proxy_gc_pause_seconds{generation}``).

Every request in flight waits out a stall, so a p99 that is far above the median either
shows here (the proxy stalled: a long callback, a collection) or does not (the time went
elsewhere: the CPU was given to another process, the network, the load generator). The timer
is a stated choice: every ``INTERVAL_S`` (10 ms; ~100 wake-ups a second, a few microseconds
each).
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from netkv_proxy.metrics import ProxyMetrics

INTERVAL_S = 0.010


class StallMonitor:
    """``with StallMonitor(metrics) as m``: GC pauses observed while inside; :meth:`run` is the
    loop-lag task (a supervised daemon)."""

    def __init__(self, metrics: ProxyMetrics, interval_s: float = INTERVAL_S) -> None:
        self.metrics, self.interval_s = metrics, interval_s
        self._gc_started = 0.0
        self._children = [metrics.gc_pause.labels(str(g)) for g in range(3)]

    def __enter__(self) -> StallMonitor:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            generation = int(info.get("generation", 2))
            self._children[min(max(generation, 0), 2)].observe(
                time.perf_counter() - self._gc_started)
            self._gc_started = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        lag, interval = self.metrics.loop_lag, self.interval_s
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            lag.observe(max(loop.time() - due, 0.0))
