"""The child processes of `netkv up`: started, checked for readiness, watched, stopped.

A child counts as *up* only when its own readiness check says so (the scheduler's and the
oracle's ``/readyz``, an agent's heartbeat in Redis) while the process is still alive, so a
port answered by some other process is never taken for the child. A child that exits while the
mesh runs is noticed by its watcher (a task owned by :class:`netkv.supervisor.Supervisor`): it
is restarted if it has restarts left (the oracles, bounded), otherwise the watcher ends and
the supervisor reports it, which stops `netkv up` with a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from netkv.tasks import stop_process

STOP_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1

Ready = Callable[[], Awaitable[tuple[bool, str]]]


class MeshError(RuntimeError):
    """`netkv up` cannot go on: the message is for the user, one line or a log tail."""


def _die_with_parent() -> None:
    """In the child: ask the kernel for SIGTERM when the parent goes away (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def port_taken(host: str, port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """True when ``host:port`` cannot be bound right now (someone else holds it)."""
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def http_ready(url: str) -> Ready:
    """A readiness check: ``GET url`` answers 200 (the body's detail is kept for messages)."""
    async def check() -> tuple[bool, str]:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http, \
                    http.get(url) as resp:
                text = (await resp.text())[:200]
                return resp.status == 200, f"{url} answered {resp.status}: {text}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, f"{url}: {type(exc).__name__} {exc}".strip()
    return check


@dataclass
class Child:
    """One child process of the mesh."""

    name: str
    argv: list[str]
    log: Path
    listens: str
    ready: Ready | None = None
    restarts: int = 0  # how many times it may be restarted after dying
    proc: asyncio.subprocess.Process | None = None
    exits: list[int] = field(default_factory=list)
    _env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                env=self._env, start_new_session=True, preexec_fn=_die_with_parent)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            await stop_process(proc, STOP_TIMEOUT_S)

    def tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def exit_reason(self) -> str:
        code = self.exits[-1] if self.exits else None
        if code is None:
            return "is not running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once the readiness check passes while the process is alive; raise
        :class:`MeshError` if it dies first or the time runs out."""
        deadline = time.monotonic() + timeout_s
        why = "no answer yet"
        while True:
            if not self.alive:
                if self.proc is not None and self.proc.returncode is not None:
                    self.exits.append(self.proc.returncode)
                raise MeshError(f"{self.name} {self.exit_reason()} before it was ready; "
                                f"log {self.log}:\n{self.tail()}")
            if self.ready is None:
                return
            ok, why = await self.ready()
            if ok and self.alive:
                return
            if time.monotonic() > deadline:
                raise MeshError(f"{self.name} (pid {self.pid}) not ready after "
                                f"{timeout_s:.0f} s: {why}; log {self.log}:\n{self.tail()}")
            await asyncio.sleep(0.2)

    async def watch(self, on_restart: Callable[[Child], None]) -> None:
        """Run for the life of the mesh: wait for the process to end; restart it while
        restarts are left; return (which the supervisor reports) when none are."""
        while True:
            proc = self.proc
            if proc is None:
                return
            code = await proc.wait()
            self.exits.append(code)
            if self.restarts <= 0:
                return
            self.restarts -= 1
            on_restart(self)
            await self.start(self._env)


__all__ = ["Child", "MeshError", "http_ready", "port_taken"]
