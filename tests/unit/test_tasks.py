"""Bounded cancellation: a swallowed cancel neither leaks a task nor hangs its owner."""

from __future__ import annotations

import asyncio
import time

import pytest

from netkv.tasks import cancel_and_wait

pytestmark = pytest.mark.unit


async def _swallow(times: int, release: asyncio.Event) -> None:
    """Like a library that eats ``times`` cancellations (or all, until ``release`` is set)
    before letting one through."""
    swallowed = 0
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed += 1
            if swallowed > times or release.is_set():
                raise


async def test_a_swallowed_cancellation_is_repeated_until_the_task_ends() -> None:
    task = asyncio.create_task(_swallow(2, asyncio.Event()))
    await asyncio.sleep(0)
    left = await cancel_and_wait([task], timeout_s=5.0, every_s=0.01)
    assert left == set()
    assert task.cancelled()


async def test_a_task_that_never_ends_is_returned_after_the_bound() -> None:
    release = asyncio.Event()
    task = asyncio.create_task(_swallow(10**9, release))
    await asyncio.sleep(0)
    started = time.monotonic()
    left = await cancel_and_wait([task], timeout_s=0.3, every_s=0.05)
    assert left == {task}
    assert time.monotonic() - started < 2.0
    assert not task.done()
    release.set()  # tidy up: now the next cancellation goes through
    assert await cancel_and_wait([task], timeout_s=5.0) == set()
