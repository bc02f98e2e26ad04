"""Pure parts of the prober: RFC 6298 smoothing, percentiles, datagram layout."""

from __future__ import annotations

import pytest
from netkv_agent.echo import MAGIC, PACKET, REQUEST, VERSION
from netkv_agent.peerstate import PeerState, PeerTarget, percentile

pytestmark = pytest.mark.unit


def test_rfc6298_smoothing_matches_hand_computation() -> None:
    state = PeerState(PeerTarget("p", "127.0.0.1", 1, 0.1), ("127.0.0.1", 1), window_s=10)
    assert state.rto == 1.0  # RFC 6298 (2.1): initial RTO of one second
    state.observe(0.100, 0.0)
    assert state.srtt == pytest.approx(0.100) and state.rttvar == pytest.approx(0.050)
    state.observe(0.200, 0.1)
    # RTTVAR <- 3/4 * 0.05 + 1/4 * |0.1 - 0.2| ; SRTT <- 7/8 * 0.1 + 1/8 * 0.2
    assert state.rttvar == pytest.approx(0.0375 + 0.025)
    assert state.srtt == pytest.approx(0.0875 + 0.025)
    assert state.rto == pytest.approx(0.1125 + 4 * 0.0625)
    assert state.sent == 2


def test_window_expires_old_rtts() -> None:
    state = PeerState(PeerTarget("p", "127.0.0.1", 1, 0.1), ("127.0.0.1", 1), window_s=1.0)
    for i in range(5):
        state.observe(0.001 * (i + 1), float(i))
    state.expire(4.5)
    assert [r for _, r in state.recent] == [0.005]


def test_percentile_nearest_rank() -> None:
    data = sorted(float(x) for x in range(1, 101))
    assert percentile(data, 0.5) == 50.0
    assert percentile(data, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0


def test_packet_layout_is_twenty_eight_bytes() -> None:
    packet = PACKET.pack(MAGIC, VERSION, REQUEST, 1, 2, 3, 0)
    assert len(packet) == 28 and packet[:2] == b"NK"
