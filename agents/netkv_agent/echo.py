"""UDP echo: the responder every agent runs, and the prober that measures RTT to its peers.

One UDP socket per agent, bound to the agent's own address, does both jobs. A datagram is
28 bytes::

    magic "NK" | version u8 | type u8 (1 request, 2 reply) | token u32 | seq u32
    | t_send u64 | hold u64

``token`` is random per prober, so replies meant for a previous incarnation of an agent on
the same port are ignored; ``t_send`` (the prober's clock, ns) is echoed back untouched;
``hold`` is filled in by the responder: how long the request sat on the responder, from the
kernel's receive timestamp to the reply. Anything else (other sizes, wrong magic, unknown
type, replies from an unexpected address) is dropped and counted.

**RTT like R-Pingmesh.** The socket has ``SO_TIMESTAMPNS``, so every datagram carries the
kernel's receive time. The RTT is ``(T5 - T2) - (T4 - T3)``: prober kernel receive minus
prober send, minus the responder's hold time. Host scheduling delay on either side is thus
taken out of the network RTT, and -- the point -- the socket need not be read the instant a
datagram lands.

**Cost.** In Python every event-loop wake-up costs tens of microseconds (about 150 us in this
project's VMs), so the agent does all echo work in *ticks*: once per tick (``tick_s``, 100 ms
by default, each agent at its own stable phase) it drains the socket (answers requests with
their hold time, matches replies), expires probes older than ``timeout_s`` (lost; a later
reply counts as ``late``), and, if a probe *round* starts, sends it. The round length is the
shortest interval of the pinglist; every peer's interval is a whole number of rounds and
slower peers are spread over rounds by a stable phase. So an agent wakes ``1/tick_s`` times a
second for echo work however many peers it has. A responder answers within one tick, so a
prober's ``timeout_s`` must exceed the tick plus the RTT (the settings check it).

Per peer the prober keeps RFC 6298 smoothed RTT and a sliding window of recent RTTs for
min/p50/p99 (:mod:`netkv_agent.peerstate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import structlog

from netkv.contracts.samples import RttSample
from netkv_agent.peerstate import PeerState, PeerTarget, percentile

log = structlog.get_logger(__name__)

MAGIC = b"NK"
VERSION = 1
REQUEST = 1
REPLY = 2
PACKET = struct.Struct("!2sBBIIQQ")
_TIMESPEC = struct.Struct("@qq")
# Linux's SO_TIMESTAMPNS (typeshed lacks it; asm-generic value, all Linux ABIs we target).
SO_TIMESTAMPNS: int = getattr(socket, "SO_TIMESTAMPNS", 35)
_CMSG_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)


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
    ticks: int = 0  # wake-ups for echo work
    rounds: int = 0  # probe rounds sent


MAX_DRAIN = 4096  # datagrams handled per tick, so a flood cannot starve the loop


def _rx_time_ns(ancdata: list[tuple[int, int, bytes]], now_ns: Callable[[], int]) -> int:
    """The kernel receive timestamp (``SO_TIMESTAMPNS``), or ``now_ns()`` if it gave none."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS \
                and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return int(sec) * 1_000_000_000 + int(nsec)
    return now_ns()


def drain(sock: socket.socket, prober: Prober) -> int:
    """Handle every queued datagram: answer requests (with their hold time), hand replies to
    the prober. Never raises; returns how many datagrams were read."""
    counters = prober.counters
    size = PACKET.size
    n = 0
    while n < MAX_DRAIN:
        try:
            data, ancdata, _, addr = sock.recvmsg(64, _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # ICMP port unreachable from a dead peer: it shows as loss
            counters.send_errors += 1
            continue
        n += 1
        if len(data) != size or data[:2] != MAGIC or data[2] != VERSION:
            counters.malformed += 1
            continue
        kind = data[3]
        if kind == REQUEST:  # the hold time is the responder's own: real clock, as the kernel's
            rx_ns = _rx_time_ns(ancdata, time.time_ns)
            hold = max(0, time.time_ns() - rx_ns)
            try:
                sock.sendto(data[:3] + _REPLY_BYTE + data[4:20] + _HOLD.pack(hold), addr)
                counters.requests_answered += 1
            except OSError:
                counters.send_errors += 1
        elif kind == REPLY:  # compared with the send time: the prober's (injected) clock
            prober.on_reply(data, addr, _rx_time_ns(ancdata, prober.clock_ns))
        else:
            counters.malformed += 1
    return n


_REPLY_BYTE = bytes((REPLY,))
_RTT = itemgetter(1)  # (clock s, rtt s) -> rtt s, without a Python-level generator
_HOLD = struct.Struct("!Q")


class Prober:
    """Schedules probes to the pinglist, matches replies, and produces :class:`RttSample`."""

    def __init__(self, reporter: str, *, timeout_s: float = 1.0, window_s: float = 5.0,
                 tick_s: float = 0.1, clock_ns: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """``clock_ns`` is the wall clock every send time, round slot, deadline and sample
        time is read from (the kernel's receive timestamps are CLOCK_REALTIME, which
        ``time.time_ns`` is); ``monotonic`` times the sample windows. Tests pass fakes and
        need no sleeps for timeouts."""
        self.reporter = reporter
        self.timeout_s = timeout_s
        self.window_s = window_s
        self.tick_s = tick_s
        # A stable per-agent phase inside the tick, so agents do not all wake at once.
        self._tick_phase = (zlib.crc32(reporter.encode()) % 1000) / 1000 * tick_s
        self.counters = EchoCounters()
        self.token = secrets.randbits(32)
        self._seq = secrets.randbits(31)
        # Send times use the same clock as the kernel's receive timestamps (CLOCK_REALTIME).
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._peers: dict[str, PeerState] = {}
        self._outstanding: dict[int, tuple[PeerState, int]] = {}
        self._round_s = 1.0  # the pinglist's shortest interval
        self._round = 0
        self._stopping = False
        self.sock: socket.socket | None = None

    # -- pinglist --------------------------------------------------------------------------
    def set_peers(self, targets: Iterable[PeerTarget]) -> None:
        """Replace the pinglist; peers that stay keep their statistics."""
        fresh: dict[str, PeerState] = {}
        for t in targets:
            state = self._peers.get(t.name)
            if state is None or state.target != t:
                old = state
                state = PeerState(t, (t.address, t.port), self.window_s,
                                  last_collect=self._monotonic())
                if old is not None:  # same peer, new address or interval: keep its history
                    state.srtt, state.rttvar = old.srtt, old.rttvar
                    state.sent, state.lost = old.sent, old.lost
                    state.recent, state.last_collect = old.recent, old.last_collect
            fresh[t.name] = state
        self._round_s = min((s.target.interval_s for s in fresh.values()), default=1.0)
        for state in fresh.values():
            # Whole rounds per probe, and a stable phase that spreads slow peers over rounds.
            state.every = max(1, round(state.target.interval_s / self._round_s))
            state.phase = zlib.crc32(state.target.name.encode()) % state.every
        self._peers = fresh

    @property
    def peers(self) -> dict[str, PeerState]:
        return self._peers

    @property
    def clock_ns(self) -> Callable[[], int]:
        """The wall clock send times and deadlines are read from (injected in tests)."""
        return self._clock_ns

    @property
    def round_s(self) -> float:
        return self._round_s

    # -- wire ------------------------------------------------------------------------------
    def on_reply(self, data: bytes, addr: tuple[str | Any, int], rx_ns: int) -> None:
        """A reply received (kernel time ``rx_ns``): match it and fold in its RTT."""
        _, _, _, token, seq, t_send, hold = PACKET.unpack(data)
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
        rtt_ns = rx_ns - sent_ns - hold
        if rx_ns - sent_ns > self.timeout_s * 1e9:  # arrived after its deadline: lost
            self.counters.late += 1
            self.counters.lost += 1
            state.sent += 1
            state.lost += 1
            return
        self.counters.replies += 1
        state.observe(max(rtt_ns, 0) / 1e9, rx_ns / 1e9)

    def _send(self, state: PeerState, now_ns: int) -> None:
        assert self.sock is not None
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._outstanding[self._seq] = (state, now_ns)
        packet = PACKET.pack(MAGIC, VERSION, REQUEST, self.token, self._seq, now_ns, 0)
        try:
            self.sock.sendto(packet, state.addr)
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

    def probe_round(self, n: int | None = None) -> int:
        """Expire old probes and send round ``n``'s probes; returns how many were sent."""
        now_ns = self._clock_ns()
        self._expire(now_ns)
        if n is None:
            n = self._round
        self._round = n + 1
        self.counters.rounds += 1
        sent = 0
        for state in self._peers.values():
            if n % state.every == state.phase:
                self._send(state, now_ns)
                sent += 1
        return sent

    def tick(self) -> None:
        """One tick of echo work: drain the socket, expire old probes, send a due round."""
        self.counters.ticks += 1
        if self.sock is not None:
            drain(self.sock, self)
        if not self._peers:
            self._expire(self._clock_ns())
            return
        n = int(self._clock_ns() / 1e9 // self._round_s)
        if n != self._round - 1:  # this round slot has not been probed yet
            self.probe_round(n)
        else:
            self._expire(self._clock_ns())

    async def run(self) -> None:
        """Tick until :meth:`stop` (or cancellation), on a wall-clock grid of ``tick_s`` at
        this agent's phase. If the loop stalls, missed ticks are skipped, not replayed."""
        while not self._stopping:
            self.tick()
            tick, phase = min(self.tick_s, self._round_s), self._tick_phase
            now = self._clock_ns() / 1e9
            k = math.floor((now - phase) / tick) + 1
            await asyncio.sleep(max(0.0, k * tick + phase - now))

    def stop(self) -> None:
        """Make :meth:`run` return at its next wake-up (besides cancellation)."""
        self._stopping = True

    # -- samples ---------------------------------------------------------------------------
    def collect(self, wall: float | None = None) -> list[RttSample]:
        """One sample per peer that resolved probes since the last call; resets the counts."""
        now_w = self._clock_ns() / 1e9
        wall = now_w if wall is None else wall
        now = self._monotonic()
        samples: list[RttSample] = []
        for state in self._peers.values():
            state.expire(now_w)
            if state.sent == 0:
                continue
            window = max(now - state.last_collect, 1e-6)
            rtts = sorted(map(_RTT, state.recent))
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
    """Bind the agent's UDP socket (responder + prober) with kernel receive timestamps;
    yields the bound ``(host, port)``. The prober's ticks read it."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(address, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind(sockaddr)
        prober.sock = sock
        try:
            bound = sock.getsockname()
            yield str(bound[0]), int(bound[1])
        finally:
            prober.sock = None
    finally:
        sock.close()
