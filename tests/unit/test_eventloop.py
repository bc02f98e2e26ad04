"""The event-loop choice (``--loop auto|uvloop|asyncio``, netkv.eventloop) and the proxy's
``loop`` setting: resolved once, uvloop named where it is missing is an error naming the
field, and :func:`netkv.eventloop.run` runs on the loop it says."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from netkv_proxy.config import ProxySettings, WorkerEntry, add_arguments, settings_from

from netkv import eventloop
from netkv.errors import InputError

pytestmark = pytest.mark.unit

P, D = (WorkerEntry(url="http://p:1"),), (WorkerEntry(url="http://d:1"),)
CHOICES: tuple[tuple[eventloop.LoopChoice, eventloop.LoopName], ...] = (
    ("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio"))


async def _running() -> str:
    return eventloop.name_of()


def test_each_choice_runs_on_the_loop_it_names() -> None:
    assert eventloop.uvloop_installed(), "uvloop is a dependency on Linux"
    assert eventloop.resolve("auto") == "uvloop"
    for choice, name in CHOICES:
        assert eventloop.run(_running(), choice) == name
    loop = asyncio.new_event_loop()
    try:
        assert eventloop.name_of(loop) == "asyncio"
    finally:
        loop.close()


def test_without_uvloop_auto_falls_back_and_uvloop_is_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventloop, "_uvloop", None)
    assert eventloop.resolve("auto") == "asyncio"
    assert eventloop.run(_running(), "auto") == "asyncio"
    with pytest.raises(InputError, match="^--loop: uvloop is not installed"):
        eventloop.resolve("uvloop", "--loop")
    coro = _running()
    with pytest.raises(InputError, match="uvloop is not installed"):
        eventloop.run(coro, "uvloop")
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        coro.send(None)  # it was closed, not left un-awaited
    with pytest.raises(InputError, match="^loop: uvloop is not installed"):
        ProxySettings(prefill=P, decode=D, loop="uvloop")
    assert ProxySettings(prefill=P, decode=D, loop="auto").loop == "auto"


def test_the_proxy_flag_and_setting() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--prefill", "http://p:1", "--decode", "http://d:1",
                              "--loop", "asyncio"])
    assert settings_from(args).loop == "asyncio"
    args = parser.parse_args(["--prefill", "http://p:1", "--decode", "http://d:1"])
    assert settings_from(args).loop == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--loop", "trio"])
    with pytest.raises(ValueError, match="loop"):
        ProxySettings(prefill=P, decode=D, loop="trio")
