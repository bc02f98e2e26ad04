"""`netkv up` as a user runs it: a real process tree, stopped with SIGINT, nothing left."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def read_until(proc: subprocess.Popen[bytes], marker: str, timeout_s: float) -> str:
    """Collect stdout (unbuffered) until it contains ``marker``, bounded in time."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
            if marker.encode() in seen:
                return seen.decode()
        elif proc.poll() is not None:
            break
    raise AssertionError(f"{marker!r} not seen; output so far:\n{seen.decode()}")


def port_free(host: str, port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def test_up_then_sigint_leaves_nothing_behind() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "netkv.cli", "up"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=dict(os.environ))
    try:
        out = read_until(proc, "Ctrl-C stops everything", 90.0)
        tcp = [(h, int(p)) for h, p in re.findall(r"(?:redis|mqtt|http)://([\d.]+):(\d+)", out)]
        udp = [(h, int(p)) for h, p in re.findall(r"udp://([\d.]+):(\d+)", out)]
        workdir = Path(re.findall(r"logs\s+(\S+)", out)[0])
        assert len(tcp) >= 3, out  # redis, mosquitto, scheduler (and the oracle when built)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3, out
        for host, port in tcp:
            assert not port_free(host, port, socket.SOCK_STREAM), (host, port)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0, out + rest
        assert "netkv up: stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [p.pid for p in alive]
    for host, port in tcp:
        assert port_free(host, port, socket.SOCK_STREAM), (host, port)
    for host, port in udp:
        assert port_free(host, port, socket.SOCK_DGRAM), (host, port)
    assert not workdir.exists()


def test_up_demo_prints_the_summary_and_exits(shared_trace: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "netkv.cli", "up", "--demo", "--no-agents", "--trace",
         str(shared_trace), "--demo-requests", "300", "--map-wait", "20"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env=dict(os.environ), check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "decisions        300 in" in out and "errors 0" in out
    assert "choices by tier:" in out and "decisions/s" in out
    assert "decision (server) p50 <=" in out
    counts = [int(n) for n in re.findall(r"tier \d \w[\w ]+?\s+(\d+)\s", out)]
    assert sum(counts) == 300, out
    assert out.rstrip().endswith("netkv up: stopped")
