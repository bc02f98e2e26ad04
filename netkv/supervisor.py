"""One owner for a service's background tasks.

Every long-lived loop of a process (an ingest loop, a feed, a prober, a publisher) is started
through a :class:`Supervisor`. It has TaskGroup semantics with two differences that a service
needs:

* a task that dies (raises, or returns while it was meant to run for the life of the service)
  is *noticed*: it is logged once with its traceback, recorded in :attr:`Supervisor.failures`
  (which a readiness endpoint reports), and :meth:`Supervisor.wait_failed` wakes, so that a
  process can exit non-zero instead of carrying on with a silently missing loop;
* shutdown is bounded: leaving the ``async with`` block cancels what is left through
  :func:`netkv.tasks.cancel_and_wait` (which repeats the cancellation for libraries that swallow
  one) and never waits longer than ``stop_timeout_s``.

Tasks are stopped in the reverse order of their start, so a loop that feeds another is stopped
after the loop it feeds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog

from netkv.tasks import cancel_and_wait

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TaskFailure:
    """How a supervised task ended when it should not have."""

    name: str
    reason: str  # "raised ExcType: message" or "returned"


class Supervisor:
    """Owns background tasks; see the module docstring.

    ``async with Supervisor("oracle") as sup: sup.spawn(loop(), name="ingest")``.
    """

    def __init__(self, service: str, *, stop_timeout_s: float = 5.0) -> None:
        self.service = service
        self.stop_timeout_s = stop_timeout_s
        self._tasks: list[asyncio.Task[Any]] = []
        self._daemon: dict[asyncio.Task[Any], bool] = {}
        self._failures: list[TaskFailure] = []
        self._failed = asyncio.Event()
        self._stopping = False
        self._entered = False

    async def __aenter__(self) -> Supervisor:
        self._entered = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str,
              daemon: bool = True) -> asyncio.Task[Any]:
        """Start ``coro`` as a supervised task.

        ``daemon=True`` (the default) means the task is meant to run until the service stops:
        returning early counts as a failure. ``daemon=False`` is for work that ends by itself; only
        an exception counts then.
        """
        if self._stopping:
            coro.close()
            raise RuntimeError(f"{self.service}: supervisor is stopping; cannot start {name}")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.service}.{name}")
        self._tasks.append(task)
        self._daemon[task] = daemon
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        daemon = self._daemon.pop(task, False)
        if self._stopping:
            return
        self._tasks.remove(task)  # done: nothing left to cancel
        if task.cancelled():
            return
        error = task.exception()  # also marks it retrieved
        if error is None and not daemon:
            return
        if error is not None:
            reason = f"raised {type(error).__name__}: {error}"
            log.error("background task died", service=self.service, task=task.get_name(),
                      exc_info=(type(error), error, error.__traceback__))
        else:
            reason = "returned"
            log.error("background task ended early", service=self.service, task=task.get_name())
        self._failures.append(TaskFailure(task.get_name(), reason))
        self._failed.set()

    @property
    def failures(self) -> tuple[TaskFailure, ...]:
        """Tasks that died, in the order they died (empty while all is well)."""
        return tuple(self._failures)

    @property
    def healthy(self) -> bool:
        return not self._failures

    async def wait_failed(self) -> TaskFailure:
        """Wait until a supervised task dies; returns the first failure."""
        await self._failed.wait()
        return self._failures[0]

    async def stop(self) -> None:
        """Cancel every task still running, newest first, within ``stop_timeout_s`` in all."""
        if self._stopping:
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout_s
        for task in reversed(self._tasks):
            left = max(0.0, deadline - loop.time())
            await cancel_and_wait([task], timeout_s=left)
        # Retrieve the exceptions of tasks that died during shutdown so that none is reported as
        # "never retrieved" by the event loop.
        for task in self._tasks:
            if task.done() and not task.cancelled():
                task.exception()
        self._tasks.clear()
