"""UDP echo: the responder every agent runs, and the prober that measures RTT to its peers.

One UDP socket per agent, bound to the agent's own address, does both jobs: requests from
other agents are answered in place (no task, no allocation beyond the reply), replies to our
own requests are matched by sequence number. A datagram is 20 bytes::

    magic "NK" | version u8 | type u8 (1 request, 2 reply) | token u32 | seq u32 | t_send u64

``token`` is random per prober, so replies meant for a previous incarnation of an agent on
the same port are ignored; ``t_send`` is the prober's ``time.monotonic_ns()`` and is echoed
back untouched, so the RTT never mixes clocks of two hosts. Anything else (other sizes, wrong
magic, unknown type, replies from an unexpected address) is dropped and counted.

Per peer the prober keeps RFC 6298 smoothed RTT (``alpha = 1/8``, ``beta = 1/4``) and a
sliding window of recent RTTs for min/p50/p99. A probe that has no reply after
``timeout_s`` counts as lost; a reply that arrives later is counted as ``late`` only.
Probes are scheduled per peer at the peer's interval from a heap, coalescing sends that fall
due within a small slack, so the event loop wakes about once per probe interval, not per peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import secrets
import struct
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from netkv.telemetry.samples import RttSample

log = structlog.get_logger(__name__)

MAGIC = b"NK"
VERSION = 1
REQUEST = 1
REPLY = 2
PACKET = struct.Struct("!2sBBIIQ")
ALPHA = 0.125
BETA = 0.25


@dataclass(frozen=True, slots=True)
class PeerTarget:
    """One entry of the pinglist: whom to probe, where, and how often."""

    name: str
    address: str
    port: int
    interval_s: float


@dataclass(slots=True)
class EchoCounters:
    """What the socket saw; exposed by the agent so drops are visible."""

    requests_answered: int = 0
    probes_sent: int = 0
    replies: int = 0
    lost: int = 0
    late: int = 0
    malformed: int = 0
    unexpected: int = 0
    send_errors: int = 0


@dataclass(slots=True)
class PeerState:
    """Live statistics for one peer; ``sent``/``lost`` are since the last collected sample."""

    target: PeerTarget
    addr: tuple[str, int]
    window_s: float
    srtt: float | None = None
    rttvar: float = 0.0
    sent: int = 0
    lost: int = 0
    recent: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=4096))  # (monotonic s, rtt s)
    last_collect: float = field(default_factory=time.monotonic)

    def observe(self, rtt: float, now: float) -> None:
        """Fold one RTT into SRTT/RTTVAR (RFC 6298 section 2) and the window."""
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt
        self.recent.append((now, rtt))
        self.sent += 1

    def expire(self, now: float) -> None:
        horizon = now - self.window_s
        recent = self.recent
        while recent and recent[0][0] < horizon:
            recent.popleft()

    @property
    def rto(self) -> float:
        """RFC 6298 retransmission timeout: SRTT + 4 RTTVAR (1 s before any measurement)."""
        return 1.0 if self.srtt is None else self.srtt + 4 * self.rttvar


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class EchoProtocol(asyncio.DatagramProtocol):
    """Answers requests and hands replies to the prober. Runs in the event loop's callback, so
    it never awaits and never raises."""

    def __init__(self, prober: Prober) -> None:
        self.prober = prober
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        counters = self.prober.counters
        if len(data) != PACKET.size or data[:2] != MAGIC or data[2] != VERSION:
            counters.malformed += 1
            return
        kind = data[3]
        if kind == REQUEST:
            if self.transport is not None:
                self.transport.sendto(data[:3] + bytes((REPLY,)) + data[4:], addr)
                counters.requests_answered += 1
        elif kind == REPLY:
            self.prober.on_reply(data, addr)
        else:
            counters.malformed += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a dead peer lands here; the probe times out as lost.
        self.prober.counters.send_errors += 1


class Prober:
    """Schedules probes to the pinglist, matches replies, and produces :class:`RttSample`."""

    def __init__(self, reporter: str, *, timeout_s: float = 1.0, window_s: float = 5.0,
                 clock_ns: Any = time.monotonic_ns) -> None:
        self.reporter = reporter
        self.timeout_s = timeout_s
        self.window_s = window_s
        self.counters = EchoCounters()
        self.token = secrets.randbits(32)
        self._seq = secrets.randbits(31)
        self._clock_ns = clock_ns
        self._peers: dict[str, PeerState] = {}
        self._outstanding: dict[int, tuple[PeerState, int]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._heap_seq = 0
        self._current: dict[str, int] = {}  # peer -> its live heap entry (older ones are void)
        self._changed = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    # -- pinglist --------------------------------------------------------------------------
    def set_peers(self, targets: Iterable[PeerTarget]) -> None:
        """Replace the pinglist; peers that stay keep their statistics."""
        now = time.monotonic()
        fresh: dict[str, PeerState] = {}
        for t in targets:
            state = self._peers.get(t.name)
            if state is None or state.target != t:
                old = state
                state = PeerState(t, (t.address, t.port), self.window_s)
                if old is not None:  # same peer, new address or interval: keep its history
                    state.srtt, state.rttvar = old.srtt, old.rttvar
                    state.sent, state.lost = old.sent, old.lost
                    state.recent, state.last_collect = old.recent, old.last_collect
                # Spread first probes over the interval so peers are not probed in lockstep.
                self._push(now + (zlib.crc32(t.name.encode()) % 1000) / 1000 * t.interval_s,
                           t.name)
            fresh[t.name] = state
        self._peers = fresh
        self._current = {k: v for k, v in self._current.items() if k in fresh}
        self._changed.set()

    @property
    def peers(self) -> dict[str, PeerState]:
        return self._peers

    def _push(self, due: float, name: str) -> None:
        self._heap_seq += 1
        self._current[name] = self._heap_seq
        heapq.heappush(self._heap, (due, self._heap_seq, name))

    # -- wire ------------------------------------------------------------------------------
    def on_reply(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        _, _, _, token, seq, t_send = PACKET.unpack(data)
        if token != self.token:
            self.counters.unexpected += 1
            return
        entry = self._outstanding.pop(seq, None)
        if entry is None:
            self.counters.late += 1
            return
        state, sent_ns = entry
        if sent_ns != t_send or (addr[0], addr[1]) != state.addr:
            self.counters.unexpected += 1
            self._outstanding[seq] = entry
            return
        now_ns = self._clock_ns()
        self.counters.replies += 1
        state.observe((now_ns - sent_ns) / 1e9, now_ns / 1e9)

    def _send(self, state: PeerState, now_ns: int) -> None:
        assert self.transport is not None
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._outstanding[self._seq] = (state, now_ns)
        packet = PACKET.pack(MAGIC, VERSION, REQUEST, self.token, self._seq, now_ns)
        try:
            self.transport.sendto(packet, state.addr)
        except OSError:
            self.counters.send_errors += 1
        self.counters.probes_sent += 1

    def _expire(self, now_ns: int) -> None:
        """Probes older than the timeout are lost. Sends are in time order, so stop at the
        first one still in time."""
        limit = now_ns - int(self.timeout_s * 1e9)
        outstanding = self._outstanding
        while outstanding:
            seq = next(iter(outstanding))
            state, sent_ns = outstanding[seq]
            if sent_ns > limit:
                break
            del outstanding[seq]
            self.counters.lost += 1
            if state is self._peers.get(state.target.name):
                state.sent += 1
                state.lost += 1

    async def run(self) -> None:
        """Probe forever (cancel to stop)."""
        heap = self._heap
        while True:
            now = time.monotonic()
            now_ns = self._clock_ns()
            self._expire(now_ns)
            while heap and heap[0][0] <= now + 0.002:
                due, token, name = heapq.heappop(heap)
                state = self._peers.get(name)
                if state is None or self._current.get(name) != token:
                    continue
                self._send(state, now_ns)
                interval = state.target.interval_s
                nxt = due + interval
                if nxt <= now:  # we fell behind (loop stalled): skip, do not burst
                    nxt = now + interval
                self._push(nxt, name)
            wake = heap[0][0] if heap else now + self.timeout_s
            if self._outstanding:
                wake = min(wake, time.monotonic() + self.timeout_s)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, wake - time.monotonic()))

    # -- samples ---------------------------------------------------------------------------
    def collect(self, wall: float | None = None) -> list[RttSample]:
        """One sample per peer that resolved probes since the last call; resets the counts."""
        wall = time.time() if wall is None else wall
        now = time.monotonic()
        now_w = self._clock_ns() / 1e9
        samples: list[RttSample] = []
        for state in self._peers.values():
            state.expire(now_w)
            if state.sent == 0:
                continue
            window = max(now - state.last_collect, 1e-6)
            rtts = sorted(r for _, r in state.recent)
            if rtts:
                p50, p99, low = percentile(rtts, 0.5), percentile(rtts, 0.99), rtts[0]
            else:  # nothing came back in the window: the RTT is at least the timeout
                p50 = p99 = low = self.timeout_s
            srtt = state.srtt if state.srtt is not None else self.timeout_s
            samples.append(RttSample(
                reporter=self.reporter, peer=state.target.name, ts=wall, window_s=window,
                sent=state.sent, lost=state.lost, srtt_s=srtt, p50_s=p50, p99_s=p99,
                min_s=low))
            state.sent = state.lost = 0
            state.last_collect = now
        return samples


@contextlib.asynccontextmanager
async def echo_endpoint(prober: Prober, address: str, port: int = 0
                        ) -> AsyncIterator[tuple[str, int]]:
    """Bind the agent's UDP socket (responder + prober); yields the bound ``(host, port)``."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: EchoProtocol(prober), local_addr=(address, port))
    prober.transport = transport
    try:
        sockname = transport.get_extra_info("sockname")
        yield str(sockname[0]), int(sockname[1])
    finally:
        prober.transport = None
        transport.close()
