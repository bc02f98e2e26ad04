"""Optional active bandwidth probe: a short, rate-capped TCP burst to a peer's sink.

Off by default (``bandwidth_probe_enabled``): counters already give each NIC's residual
bandwidth for free, and an active probe spends the very bandwidth it measures (pathload's
warning: a saturating flow "increases delays and jitter"). When enabled, every agent runs a
:class:`BandwidthSink` (a TCP listener on its own address that reads and discards, with a
connection cap and a per-connection byte cap), and every ``bandwidth_probe_interval_s`` the
agent sends ``bandwidth_probe_bytes`` to one peer, paced so that it never exceeds
``bandwidth_probe_rate_mbps``. The achieved rate is a lower bound of the path's available
bandwidth up to that cap (bulk transfer capacity, not capacity).

There is no sample kind for it in the wire schema, so results are kept in the agent's stats
(``bandwidth_probes``) and logs; the oracle does not consume them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

CHUNK = 64 * 1024
MAX_CONNECTIONS = 4
MAX_BYTES_PER_CONNECTION = 256 * 1024 * 1024
IDLE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class BurstResult:
    peer: str
    nbytes: int
    seconds: float

    @property
    def bytes_s(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0


class BandwidthSink:
    """Accepts bursts and discards them; bounded in connections, bytes and idle time."""

    def __init__(self) -> None:
        self.active = 0
        self.received = 0
        self.refused = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_CONNECTIONS:
            self.refused += 1
            writer.close()
            return
        self.active += 1
        got = 0
        try:
            while got < MAX_BYTES_PER_CONNECTION:
                async with asyncio.timeout(IDLE_TIMEOUT_S):
                    data = await reader.read(CHUNK)
                if not data:
                    break
                got += len(data)
        except (TimeoutError, OSError):
            pass
        finally:
            self.active -= 1
            self.received += got
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def bandwidth_sink(address: str, port: int = 0
                         ) -> AsyncIterator[tuple[BandwidthSink, int]]:
    """Listen on ``address:port``; yields the sink and the bound port."""
    sink = BandwidthSink()
    server = await asyncio.start_server(sink.handle, address, port)
    try:
        yield sink, int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def burst(peer: str, address: str, port: int, nbytes: int, rate_bytes_s: float,
                *, timeout_s: float = 30.0) -> BurstResult:
    """Send ``nbytes`` to a sink, never faster than ``rate_bytes_s`` (token pacing per chunk).

    Bounded by ``timeout_s``; the time is measured from connect to the last byte handed to
    the kernel and drained (``drain``), which is what the path accepted.
    """
    payload = bytes(CHUNK)
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(address, port)
        del reader
        try:
            start = time.monotonic()
            sent = 0
            while sent < nbytes:
                size = min(CHUNK, nbytes - sent)
                writer.write(payload[:size])
                await writer.drain()
                sent += size
                ahead = sent / rate_bytes_s - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            elapsed = time.monotonic() - start
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return BurstResult(peer, sent, elapsed)
