"""Error logs that cannot flood a disk: at most ``burst`` lines per ``interval_s`` per event.

A flood of bad connections or failing requests must cost a few log lines, not a gigabyte
(issue 9: 121k tracebacks in 30 s). Lines past the budget are counted, and the next line that
is let through says how many were suppressed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog


class RateLimitedLog:
    """``log.error(event, **kw)`` through a per-event budget (token bucket)."""

    def __init__(self, name: str, *, burst: int = 5, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = structlog.get_logger(name)
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        self._budget: dict[str, tuple[float, float]] = {}  # event -> (tokens, last refill)
        self.suppressed: dict[str, int] = {}

    def allow(self, event: str) -> bool:
        now = self.clock()
        tokens, last = self._budget.get(event, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.burst / self.interval_s)
        if tokens < 1.0:
            self._budget[event] = (tokens, now)
            self.suppressed[event] = self.suppressed.get(event, 0) + 1
            return False
        self._budget[event] = (tokens - 1.0, now)
        return True

    def _emit(self, level: str, event: str, kw: dict[str, Any]) -> bool:
        if not self.allow(event):
            return False
        dropped = self.suppressed.pop(event, 0)
        if dropped:
            kw["suppressed"] = dropped
        getattr(self.log, level)(event, **kw)
        return True

    def error(self, event: str, **kw: Any) -> bool:
        return self._emit("error", event, kw)

    def warning(self, event: str, **kw: Any) -> bool:
        return self._emit("warning", event, kw)


_loop_log = RateLimitedLog("asyncio")


def limit_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Route the loop's error reports (e.g. ``accept() out of system resource``, logged with
    a traceback each time) through a per-message budget; idempotent."""
    if getattr(loop.get_exception_handler(), "_netkv_limited", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        _loop_log.error(str(context.get("message", "event loop error"))[:200],
                        error=repr(exc)[:300] if exc is not None else None)
    handler._netkv_limited = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
