"""The echo responder and prober on real loopback sockets: RTT, loss when a peer dies,
hostile datagrams ignored and counted."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest
from helpers import until
from netkv_agent.echo import MAGIC, PACKET, REPLY, VERSION, Prober, echo_endpoint
from netkv_agent.peerstate import PeerTarget

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def running(prober: Prober, address: str) -> AsyncIterator[tuple[str, int]]:
    async with echo_endpoint(prober, address, 0) as bound:
        task = asyncio.create_task(prober.run())
        try:
            yield bound
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_rtt_between_two_agents_on_loopback() -> None:
    a, b = Prober("a", timeout_s=0.5), Prober("b", timeout_s=0.5)
    async with running(a, "127.0.0.21") as ea, running(b, "127.0.0.22") as eb:
        a.set_peers([PeerTarget("b", *eb, 0.02)])
        b.set_peers([PeerTarget("a", *ea, 0.02)])
        await until(lambda: a.peers["b"].sent >= 10, what="10 probes resolved")
        samples = a.collect()
    assert len(samples) == 1
    s = samples[0]
    assert (s.reporter, s.peer) == ("a", "b")
    assert s.sent >= 10 and s.lost == 0
    assert 0 < s.min_s <= s.p50_s <= s.p99_s < 0.5
    assert s.min_s <= s.srtt_s < 0.5
    assert a.counters.replies == a.counters.probes_sent - len(a._outstanding)
    assert b.counters.requests_answered >= s.sent  # b answered a's probes


async def test_loss_counted_when_peer_dies() -> None:
    a, b = Prober("a", timeout_s=0.2), Prober("b")
    async with running(a, "127.0.0.23"):
        async with running(b, "127.0.0.24") as eb:
            a.set_peers([PeerTarget("b", *eb, 0.02)])
            await until(lambda: a.peers["b"].sent >= 5, what="probes answered")
            alive = a.collect()
        # b is gone: probes now time out (the first window after death may still hold a
        # reply that was in flight; the next one is all loss)
        await until(lambda: a.peers["b"].lost > 0, what="a first loss")
        a.collect()
        await until(lambda: a.peers["b"].lost >= 5, what="five losses")
        dead = a.collect()
    assert alive and alive[0].lost == 0 and alive[0].sent > 0
    assert dead and dead[0].sent > 0
    assert dead[0].lost == dead[0].sent  # everything after the death is lost...
    assert a.counters.lost >= dead[0].lost
    # ...while p50/p99 stay those of the window's answered probes (loss is in lost/sent)
    assert dead[0].p99_s < 0.2


async def test_rtt_fields_report_timeout_when_nothing_ever_answered() -> None:
    a = Prober("a", timeout_s=0.1)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound but never answers
    sink.bind(("127.0.0.25", 0))
    try:
        async with running(a, "127.0.0.26"):
            host, port = sink.getsockname()
            a.set_peers([PeerTarget("mute", host, port, 0.02)])
            await until(lambda: a.peers["mute"].lost > 0, what="a probe timed out")
            [s] = a.collect()
    finally:
        sink.close()
    assert s.sent > 0 and s.lost == s.sent
    assert s.p50_s == s.p99_s == s.min_s == s.srtt_s == pytest.approx(0.1)


async def test_hostile_datagrams_are_dropped_and_counted() -> None:
    a = Prober("a", timeout_s=0.2)
    async with running(a, "127.0.0.27") as ea:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.28", 0))
        try:
            s.sendto(b"hello", ea)  # wrong size
            s.sendto(b"XX" + bytes(18), ea)  # wrong magic
            s.sendto(PACKET.pack(MAGIC, VERSION, 9, 0, 0, 0, 0), ea)  # unknown type
            s.sendto(PACKET.pack(MAGIC, VERSION, REPLY, a.token ^ 1, 1, 1, 0), ea)  # foreign
            s.sendto(PACKET.pack(MAGIC, VERSION, REPLY, a.token, 12345, 1, 0), ea)  # no such seq
            # a real request is still answered, with the time it was held
            s.sendto(PACKET.pack(MAGIC, VERSION, 1, 7, 8, 9, 0), ea)
            s.settimeout(2.0)
            reply = await asyncio.get_running_loop().run_in_executor(None, s.recv, 64)
        finally:
            s.close()
        # the request came after the five others, so its answer means all six were drained
        await until(lambda: a.counters.requests_answered == 1, what="the request answered")
    *fields, hold = PACKET.unpack(reply)
    assert fields == [MAGIC, VERSION, REPLY, 7, 8, 9]
    assert 0 <= hold < 2e9
    assert a.counters.malformed == 3
    assert a.counters.unexpected == 1
    assert a.counters.late == 1
    assert a.counters.requests_answered == 1


async def test_responder_hold_time_is_taken_out_of_the_rtt() -> None:
    """A slow responder (50 ms in user space) that reports its hold time does not inflate
    the network RTT: (T5 - T2) - (T4 - T3), as R-Pingmesh measures."""
    a = Prober("a", timeout_s=0.5, tick_s=0.02)
    slow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    slow.bind(("127.0.0.31", 0))
    slow.settimeout(0.5)
    loop = asyncio.get_running_loop()

    def answer_slowly(n: int) -> None:
        for _ in range(n):
            data, addr = slow.recvfrom(64)
            received = time.monotonic_ns()
            magic, version, _, token, seq, t_send, _ = PACKET.unpack(data)
            time.sleep(0.05)
            hold = time.monotonic_ns() - received
            slow.sendto(PACKET.pack(magic, version, REPLY, token, seq, t_send, hold), addr)

    try:
        async with running(a, "127.0.0.32"):
            host, port = slow.getsockname()
            a.set_peers([PeerTarget("slow", host, port, 0.1)])
            await loop.run_in_executor(None, answer_slowly, 5)
            await until(lambda: a.peers["slow"].sent == 5, what="the fifth reply")
            [s] = a.collect()
    finally:
        slow.close()
    assert s.sent == 5 and s.lost == 0
    # the >= 50 ms hold is not network time (what remains is this thread's wake-up noise)
    assert s.p50_s < 0.01 and s.p99_s < 0.045
    assert s.min_s >= 0


def test_interval_is_respected_and_pinglist_change_keeps_stats() -> None:
    """One second of ticks every 10 ms on the injected clock: exactly one probe per round
    slot (20 at 50 ms, then 10 at 100 ms: a slower pinglist is not double-scheduled), and
    a peer whose interval changes keeps its statistics. Real sends, fake time."""
    wall_ns = [1000_002_000_000]  # 2 ms past a round boundary: no tick lands on one
    a = Prober("a", timeout_s=0.5, clock_ns=lambda: wall_ns[0], monotonic=lambda: 50.0)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the peer; answers by hand
    sink.bind(("127.0.0.29", 0))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.30", 0))
    sock.setblocking(False)
    a.sock = sock

    def one_second() -> int:
        a.counters.probes_sent = 0
        for _ in range(100):
            a.tick()
            wall_ns[0] += 10_000_000
        return a.counters.probes_sent

    try:
        host, port = sink.getsockname()
        a.set_peers([PeerTarget("b", host, port, 0.05)])
        first = one_second()
        # answer the latest probe (still in time; the wire packet itself) 1 ms after its send
        sink.settimeout(2.0)
        data = b""
        for _ in range(first):
            data, _ = sink.recvfrom(64)
        magic, version, _, token, seq, t_send, _ = PACKET.unpack(data)
        a.on_reply(PACKET.pack(magic, version, REPLY, token, seq, t_send, 0), (host, port),
                   t_send + 1_000_000)
        a.set_peers([PeerTarget("b", host, port, 0.1)])  # slower: must not double-schedule
        srtt = a.peers["b"].srtt
        second = one_second()
    finally:
        a.sock = None
        sock.close()
        sink.close()
    assert first == 20  # one per 50 ms round slot
    assert second == 10 and second < first  # one per 100 ms round slot
    assert srtt == pytest.approx(0.001)  # kept across the pinglist change


def test_timeouts_follow_the_injected_clock_with_no_sleep() -> None:
    """The prober reads every send time, deadline, round slot and window from its clocks, so
    a timeout verdict needs no real waiting: advance the fake clock past the timeout."""
    wall_ns = [1_000 * 10**9]
    mono = [50.0]
    a = Prober("a", timeout_s=0.5, clock_ns=lambda: wall_ns[0], monotonic=lambda: mono[0])
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    sink.bind(("127.0.0.29", 0))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.30", 0))
    sock.setblocking(False)
    a.sock = sock
    try:
        host, port = sink.getsockname()
        a.set_peers([PeerTarget("mute", host, port, 1.0)])
        a.tick()  # round 1000 of 1 s: one probe
        assert a.counters.probes_sent == 1 and a.counters.lost == 0
        wall_ns[0] += 400_000_000  # 0.4 s: still within the 0.5 s timeout, same round
        a.tick()
        assert a.counters.lost == 0 and a.counters.probes_sent == 1
        wall_ns[0] += 200_000_000  # 0.6 s after the send: lost, and no new round yet
        mono[0] += 0.6
        a.tick()
        assert a.counters.lost == 1 and a.counters.probes_sent == 1
        [s] = a.collect()
        assert s.sent == s.lost == 1 and s.ts == pytest.approx(1000.6)
        assert s.window_s == pytest.approx(0.6)
    finally:
        a.sock = None
        sock.close()
        sink.close()
