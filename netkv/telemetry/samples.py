"""Typed telemetry samples: what an agent measured, about which of its own links or peers.

Rates are per second over the sample's window, already differenced from counters by the agent
(so counter resets and wraps are handled once, at the source). Every sample names the
``reporter`` (the agent's identity: a host, or a leaf/pod for a switch agent); the oracle only
accepts samples whose subject the reporter owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class RttSample:
    """Round-trip probes from ``reporter`` to ``peer`` over one window."""

    kind: ClassVar[str] = "rtt"
    reporter: str
    peer: str
    ts: float  # wall-clock end of the window (unix seconds)
    window_s: float
    sent: int
    lost: int
    srtt_s: float  # RFC 6298 smoothed RTT
    p50_s: float
    p99_s: float
    min_s: float


@dataclass(frozen=True, slots=True)
class NicSample:
    """Ethernet counters of one of the reporter's NICs, as rates (netlink)."""

    kind: ClassVar[str] = "nic"
    reporter: str
    nic: str  # interface name on the host, e.g. eth0
    ts: float
    window_s: float
    tx_bytes_s: float
    rx_bytes_s: float
    tx_packets_s: float
    rx_packets_s: float
    drops_s: float
    errors_s: float
    speed_bytes_s: float  # link speed (sysfs or config); 0 when unknown


@dataclass(frozen=True, slots=True)
class QdiscSample:
    """Traffic-control state of one NIC's root qdisc: queue build-up means congestion."""

    kind: ClassVar[str] = "qdisc"
    reporter: str
    nic: str
    ts: float
    window_s: float
    backlog_bytes: float
    backlog_packets: float
    drops_s: float


@dataclass(frozen=True, slots=True)
class RdmaSample:
    """RDMA port counters (sysfs) as rates; data counters already converted from 4-byte
    words to bytes."""

    kind: ClassVar[str] = "rdma"
    reporter: str
    device: str  # e.g. mlx5_0
    port: int
    ts: float
    window_s: float
    tx_bytes_s: float
    rx_bytes_s: float
    cnp_sent_s: float  # np_cnp_sent: we were a congested receiver
    cnp_handled_s: float  # rp_cnp_handled: we were told to slow down
    ecn_marked_s: float  # np_ecn_marked_roce_packets
    xmit_wait_s: float  # port_xmit_wait ticks per second


Sample = RttSample | NicSample | QdiscSample | RdmaSample
SAMPLE_TYPES: dict[str, type[Sample]] = {
    cls.kind: cls for cls in (RttSample, NicSample, QdiscSample, RdmaSample)
}
