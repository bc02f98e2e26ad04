"""Signal-to-stop wiring, once: SIGINT and SIGTERM set an event the process waits on.

::

    with stop_on_signals() as stop:
        async with Service(...) as service:
            await stop.wait()

The handlers are removed when the block ends (a test that runs a service in-process leaves the
loop as it found it). Where the loop cannot install handlers (not the main thread, or a
platform without ``add_signal_handler``) the event is still returned and simply never set by a
signal. Every command that serves until it is stopped uses it (agent, oracle, scheduler,
proxy, engine, `netkv up`, the testbed engine hosts and the benchmarks' servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator, Sequence
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted:
    """Whether a command that raises :class:`KeyboardInterrupt` from its own signal handler
    (``netkv testbed``) was interrupted. The raise can land where it is lost (seen: inside a
    library's module import, early in a replay); the flag lets the command's long steps notice
    it anyway (:func:`watch_interrupt`) and its exit code say so."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


INTERRUPTED = Interrupted()


async def watch_interrupt(poll_s: float = 0.1) -> None:
    """Raise :class:`KeyboardInterrupt` (ending ``asyncio.run`` as a Ctrl-C does) once
    :data:`INTERRUPTED` is set; run beside a long step."""
    while not INTERRUPTED:  # noqa: ASYNC110 - set by a signal handler, which has no loop
        await asyncio.sleep(poll_s)
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[signal.Signals] = STOP_SIGNALS) -> Iterator[asyncio.Event]:
    """An event set by the first of ``signals`` (call inside a running event loop)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in signals:
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def wait_for_stop_or_failure(stop: asyncio.Event, failed: asyncio.Future[Any] | None,
                                   timeout_s: float | None = None) -> bool:
    """Wait until ``stop`` is set, ``failed`` completes (a supervised task died) or
    ``timeout_s`` passes; True if it was the failure."""
    waiter = asyncio.ensure_future(stop.wait())
    pending = {waiter} | ({failed} if failed is not None else set())
    try:
        done, _ = await asyncio.wait(pending, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in pending:
            future.cancel()
        for future in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await future
    return failed is not None and failed in done
