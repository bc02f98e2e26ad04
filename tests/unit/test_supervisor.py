"""The supervisor notices dead tasks and stops the rest within its bound."""

from __future__ import annotations

import asyncio

import pytest

from netkv.supervisor import Supervisor

pytestmark = pytest.mark.unit


async def _forever() -> None:
    await asyncio.Event().wait()


async def _boom() -> None:
    await asyncio.sleep(0)
    raise ValueError("the feed broke")


async def test_a_task_that_raises_is_noticed() -> None:
    async with Supervisor("svc") as sup:
        sup.spawn(_forever(), name="ok")
        sup.spawn(_boom(), name="feed")
        failure = await asyncio.wait_for(sup.wait_failed(), 2)
        assert failure.name == "svc.feed"
        assert failure.reason == "raised ValueError: the feed broke"
        assert not sup.healthy


async def test_a_daemon_that_returns_is_a_failure_but_a_job_is_not() -> None:
    async def done() -> None:
        return None

    async with Supervisor("svc") as sup:
        job = sup.spawn(done(), name="job", daemon=False)
        await job
        await asyncio.sleep(0)
        assert sup.healthy
        sup.spawn(done(), name="loop")
        failure = await asyncio.wait_for(sup.wait_failed(), 2)
        assert failure.reason == "returned"


async def test_stop_is_bounded_even_when_a_task_swallows_cancellation() -> None:
    stubborn_stopped = asyncio.Event()

    async def stubborn() -> None:
        for _ in range(3):  # swallows two cancellations, then gives in
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                continue
        stubborn_stopped.set()

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with Supervisor("svc", stop_timeout_s=2.0) as sup:
        sup.spawn(stubborn(), name="stubborn")
        sup.spawn(_forever(), name="plain")
        await asyncio.sleep(0)
    assert loop.time() - t0 < 2.0
    assert stubborn_stopped.is_set()
    assert sup.healthy  # cancellation at shutdown is not a failure


async def test_no_spawn_after_stop() -> None:
    sup = Supervisor("svc")
    async with sup:
        pass
    coro = _forever()
    with pytest.raises(RuntimeError, match="stopping"):
        sup.spawn(coro, name="late")
