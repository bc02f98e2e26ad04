"""Bounded cancellation of background tasks.

A single ``task.cancel()`` is not always enough: a library may swallow one cancellation
(redis-py's asyncio client does, now and then), and an owner that then awaits the task without
a bound hangs its whole shutdown. Owners call :func:`cancel_and_wait`, which repeats the
cancellation until the tasks end or the deadline passes, and never waits longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterable
from typing import Any

import structlog

log = structlog.get_logger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout_s: float,
                          every_s: float = 0.1) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` (again every ``every_s``) until they end or ``timeout_s`` passes.

    Returns the tasks still running at the deadline (logged); an empty set on success.
    """
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)
    if pending:
        log.warning("tasks did not stop in time", tasks=sorted(t.get_name() for t in pending))
    return pending


async def stop_process(proc: asyncio.subprocess.Process, timeout_s: float) -> int:
    """SIGTERM ``proc``, wait at most ``timeout_s`` for it, then SIGKILL it; its exit code.

    A process that already ended (or vanished) is fine; the wait after SIGKILL is unbounded
    only in name: the kernel ends a killed process at once."""
    if proc.returncode is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        async with asyncio.timeout(timeout_s):
            return await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return await proc.wait()


def stop_popen(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """:func:`stop_process` for a :class:`subprocess.Popen` (blocking): SIGTERM, at most
    ``timeout_s`` to end, then SIGKILL; its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
