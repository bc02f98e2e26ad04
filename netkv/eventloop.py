"""Which asyncio event loop a command runs on: ``--loop auto|uvloop|asyncio``, one definition.

``uvloop`` (libuv under asyncio's API, as vLLM's own API server and uvicorn run by default)
cuts the loop's own cost per socket event; ``asyncio`` is the standard library's loop;
``auto`` (the default) is uvloop where it is installed (a dependency of netkv on Linux),
else asyncio. A command that takes the choice resolves it once at start-up (:func:`resolve`:
naming uvloop where it is not installed is an error naming the field) and runs its main
coroutine with :func:`run`; :func:`name_of` says which loop is running (printed at
start-up and recorded by the benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any, Literal, TypeVar

from netkv.errors import InputError

_uvloop: ModuleType | None
try:
    import uvloop as _uvloop
except ImportError:  # not installed (or not a platform it supports): asyncio's own loop
    _uvloop = None

LoopChoice = Literal["auto", "uvloop", "asyncio"]
LoopName = Literal["uvloop", "asyncio"]
LOOP_CHOICES: tuple[LoopChoice, ...] = ("auto", "uvloop", "asyncio")
T = TypeVar("T")


def uvloop_installed() -> bool:
    return _uvloop is not None


def resolve(choice: LoopChoice, where: str = "loop") -> LoopName:
    """The loop ``choice`` stands for here; ``uvloop`` without uvloop installed is an
    :class:`~netkv.errors.InputError` naming ``where``."""
    if choice == "asyncio":
        return "asyncio"
    if uvloop_installed():
        return "uvloop"
    if choice == "uvloop":
        raise InputError(where, "uvloop is not installed (pip install uvloop, or choose "
                         "asyncio or auto)")
    return "asyncio"


def loop_factory(choice: LoopChoice) -> Callable[[], asyncio.AbstractEventLoop]:
    if resolve(choice) == "uvloop" and _uvloop is not None:
        factory: Callable[[], asyncio.AbstractEventLoop] = _uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: LoopChoice = "auto") -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    try:
        factory = loop_factory(choice)
    except BaseException:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def name_of(loop: asyncio.AbstractEventLoop | None = None) -> LoopName:
    """``uvloop`` or ``asyncio``: the running loop (or ``loop``)."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.split(".")[0] == "uvloop" else "asyncio"


def add_loop_argument(parser: argparse.ArgumentParser, *, default: LoopChoice | None = None,
                      what: str = "the command") -> None:
    """``--loop auto|uvloop|asyncio`` with the same help everywhere."""
    parser.add_argument("--loop", choices=LOOP_CHOICES, default=default,
                        help=f"event loop {what} runs on: auto (default: uvloop when "
                        "installed, else asyncio), uvloop, asyncio")
