"""``netkv proxy --loop uvloop|asyncio`` as a real process: it says which loop it runs on,
serves both legs (non-streaming and SSE) in front of real engine processes on the same loop
(the bench's instant engine), and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import aiohttp
import msgspec
import pytest

from netkv.bench.proxy_servers import MODEL
from netkv.eventloop import LoopName
from netkv.localservers import free_port


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def _listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _ready(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("proxy ready: "):
                return line
    raise AssertionError(f"the proxy did not start (exit code {proc.poll()})")


@pytest.fixture
def proxy(request: pytest.FixtureRequest) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The instant engine and ``netkv proxy`` in front of it, both on the loop given;
    yields the proxy's ready line and its process."""
    loop: LoopName = request.param
    prefill, decode = free_port(), free_port()
    engine = subprocess.Popen([sys.executable, "-m", "netkv.bench.proxy_servers", "instant",
                               str(prefill), str(decode), "4", "--loop", loop],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        _listening(prefill)
        _listening(decode)
        proc = subprocess.Popen(
            [sys.executable, "-m", "netkv.cli", "proxy", "--port", "0", "--loop", loop,
             "--prefill", f"http://127.0.0.1:{prefill}=ph", "--decode",
             f"http://127.0.0.1:{decode}=dh"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            yield _ready(proc), proc
        finally:
            _stop(proc)
    finally:
        _stop(engine)


@pytest.mark.parametrize("proxy", ["uvloop", "asyncio"], indirect=True)
async def test_the_proxy_runs_on_the_loop_it_is_given(
        proxy: tuple[str, subprocess.Popen[str]], request: pytest.FixtureRequest) -> None:
    loop = request.node.callspec.params["proxy"]
    line, proc = proxy
    assert f" loop={loop}" in line, line
    url = line.split()[2]
    async with aiohttp.ClientSession() as http:
        for stream in (False, True):
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": stream}
            async with http.post(f"{url}/v1/completions", json=body,
                                 headers={"X-Request-Id": f"loop-{stream}"}) as r:
                data = await r.read()
                assert r.status == 200, data
                assert r.headers["x-request-id"] == f"loop-{stream}"
                assert r.headers["x-netkv-prefill"] == "ph"
                assert r.headers["x-netkv-decode"] == "dh"
            if stream:
                assert data.count(b"data: ") == 5 and data.endswith(b"data: [DONE]\n\n")
            else:
                assert msgspec.json.decode(data)["choices"][0]["text"] == " ok"
        async with http.get(f"{url}/netkv/state") as r:
            state = await r.json()
        assert state["bookings"] == 0 and state["placements"] == 0
        assert state["upstream_open"] == 0
    assert _stop(proc) == 0  # SIGTERM: a clean stop
