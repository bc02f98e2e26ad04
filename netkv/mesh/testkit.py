"""Helpers for tests that run `netkv up` as a user does: read its output with a bound, and
find ports that are free right now (the fixed defaults may be taken on a shared machine)."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time

from netkv.localservers import free_port


def read_until(proc: subprocess.Popen[bytes], marker: str, timeout_s: float,
               seen: list[bytes] | None = None) -> str:
    """Collect stdout (unbuffered) until it contains ``marker``, bounded in time."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = seen if seen is not None else []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf.append(chunk)
            if marker.encode() in b"".join(buf):
                return b"".join(buf).decode()
        elif proc.poll() is not None:
            break
    raise AssertionError(f"{marker!r} not seen; output so far:\n{b''.join(buf).decode()}")


def port_free(host: str, port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def port_pair() -> int:
    """A TCP port p with p + 1 also free (the oracle and its standby)."""
    for _ in range(50):
        p = free_port()
        if p < 65535 and port_free("127.0.0.1", p + 1, socket.SOCK_STREAM):
            return p
    raise AssertionError("no two adjacent free ports")


def udp_port_on_agents() -> int:
    for _ in range(50):
        p = free_port()
        if all(port_free(f"127.0.0.{11 + i}", p, socket.SOCK_DGRAM) for i in range(8)):
            return p
    raise AssertionError("no UDP port free on 127.0.0.11-18")
