"""Real redis-server and mosquitto processes on loopback, for `netkv up` and the tests.

Each server is an async context manager that picks a free port (or takes one), waits until
the port accepts connections, and on exit terminates the process with a bounded wait.
``restart()`` keeps the port, so clients can be shown to survive a server restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from netkv.tasks import stop_process


class ServerError(RuntimeError):
    """A local server could not be started."""


async def wait_http_ready(url: str, exit_code: Callable[[], int | None] | None,
                          timeout_s: float, every_s: float = 0.25) -> None:
    """Return once ``GET url`` answers 200; raise :class:`ServerError` if ``exit_code()``
    (the child's ``poll``) says the process ended first, or after ``timeout_s`` (the message
    says what the last try saw)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
        while loop.time() < deadline:
            code = exit_code() if exit_code is not None else None
            if code is not None:
                raise ServerError(f"exited with {code} before {url} was ready")
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = str(exc) or type(exc).__name__
            await asyncio.sleep(every_s)
    raise ServerError(f"not ready at {url} after {timeout_s:g}s: {last}")


def free_port(host: str = "127.0.0.1", *, at_most: int = 65535) -> int:
    """A TCP port that is free on ``host`` right now, no higher than ``at_most``.

    (Redis Cluster needs ``port + 10000`` for its bus, so cluster nodes ask for <= 55535.)
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port <= at_most:
            return port
    raise ServerError(f"no free port at or below {at_most} on {host}")


async def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Return once ``host:port`` accepts a TCP connection, or raise after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, TimeoutError):
            if loop.time() > deadline:
                raise ServerError(f"nothing accepts connections on {host}:{port}") from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


class _ServerProcess:
    """Shared start/stop logic; subclasses say which binary and arguments to run."""

    binary = ""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 workdir: str | Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"netkv-{self.binary}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc: asyncio.subprocess.Process | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        # Debian puts mosquitto in /usr/sbin, which a non-root PATH may lack.
        exe = shutil.which(self.binary, path=f"{os.environ.get('PATH', '')}:/usr/sbin")
        if exe is None:
            raise ServerError(f"{self.binary} is not installed (Debian package: "
                              f"{'redis-server' if 'redis' in self.binary else 'mosquitto'})")
        log = (self.workdir / f"{self.binary}.log").open("ab")
        self._proc = await asyncio.create_subprocess_exec(
            exe, *self.command()[1:], stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            cwd=self.workdir, start_new_session=True)
        log.close()
        try:
            await wait_for_port(self.host, self.port)
        except ServerError:
            await self.stop()
            tail = (self.workdir / f"{self.binary}.log").read_text(errors="replace")[-600:]
            raise ServerError(f"{self.binary} did not start on {self.host}:{self.port}: "
                              f"{tail}") from None

    async def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await stop_process(proc, timeout_s)

    async def restart(self, down_s: float = 0.0) -> None:
        await self.stop()
        if down_s:
            await asyncio.sleep(down_s)
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class RedisServer(_ServerProcess):
    """``redis-server`` with no persistence, bound to one loopback address."""

    binary = "redis-server"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 workdir: str | Path | None = None, *, password: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(host, port, workdir)
        self.password = password
        self.extra_args = extra_args

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "",
               "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + list(self.extra_args)


class MosquittoServer(_ServerProcess):
    """``mosquitto`` with one listener on a loopback address, anonymous unless a password
    file is given."""

    binary = "mosquitto"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 workdir: str | Path | None = None, *, password_file: str | None = None,
                 extra_config: str = "") -> None:
        super().__init__(host, port, workdir)
        self.password_file = password_file
        self.extra_config = extra_config

    def command(self) -> list[str]:
        conf = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} {self.host}", "persistence false",
                 "log_dest stderr", "log_type error", "log_type warning"]
        if self.password_file:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines += ["allow_anonymous true"]
        conf.write_text("\n".join(lines) + "\n" + self.extra_config)
        return [self.binary, "-c", str(conf)]
