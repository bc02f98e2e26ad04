"""Typed telemetry samples: what an agent measured, about which of its own links or peers.

Rates are per second over the sample's window, already differenced from counters by the agent
(so counter resets and wraps are handled once, at the source). Every sample names the
``reporter`` (the agent's identity: a host, or a leaf/pod for a switch agent); the oracle only
accepts samples whose subject the reporter owns.

Each kind is a frozen msgspec Struct tagged by ``k`` on the wire (``"rtt"``, ``"nic"``,
``"qdisc"``, ``"rdma"``); the bounds of every field are part of its type
(:mod:`netkv.contracts.fields`), so the decoder rejects NaN, negative or absurd values with the
field's path. ``kind`` is the same tag, for code that counts samples by kind.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from netkv.contracts.fields import BitsPerSecond, Count, Rate, Seconds, ShortStr, UnixTime, Window

# Names are length-checked by the decoder and pattern-checked once per distinct value by
# :func:`netkv.contracts.wire.decode_batch` (a regex per string would double the decode cost).
Name = ShortStr


# gc=False (inherited by every kind): a sample holds only numbers and strings, so it can never
# be part of a reference cycle; untracked, the hundreds of thousands decoded per second do not
# trigger the cyclic collector's passes over the oracle's heap.
class _Sample(msgspec.Struct, frozen=True, tag_field="k", forbid_unknown_fields=True,
              gc=False):
    kind: ClassVar[str]


class RttSample(_Sample, frozen=True, tag="rtt"):
    """Round-trip probes from ``reporter`` to ``peer`` over one window."""

    kind: ClassVar[str] = "rtt"
    reporter: Name
    peer: Name
    ts: UnixTime  # wall-clock end of the window (unix seconds)
    window_s: Window
    sent: Count
    lost: Count
    srtt_s: Seconds  # RFC 6298 smoothed RTT
    p50_s: Seconds
    p99_s: Seconds
    min_s: Seconds

    def __post_init__(self) -> None:
        if self.lost > self.sent:
            raise ValueError("lost cannot exceed sent")


class NicSample(_Sample, frozen=True, tag="nic"):
    """Ethernet counters of one of the reporter's NICs, as rates (netlink), and the NIC's
    negotiated rate and operational state.

    ``capacity_bps`` is the rate the NIC can send at now, in bits/s: the negotiated link speed
    (sysfs ``speed``), or the rate of a ``tbf`` root qdisc when one shapes the NIC (how the
    testbeds emulate a NIC that negotiated a lower rate), or the configured speed; 0 when
    unknown (the oracle then keeps the topology's nominal capacity). ``oper_up`` is the
    kernel's operational state (``IFF_RUNNING``/``operstate up``): a NIC that is down carries
    nothing, whatever its counters say.
    """

    kind: ClassVar[str] = "nic"
    reporter: Name
    nic: Name  # interface name on the host, e.g. eth0
    ts: UnixTime
    window_s: Window
    tx_bytes_s: Rate
    rx_bytes_s: Rate
    tx_packets_s: Rate
    rx_packets_s: Rate
    drops_s: Rate
    errors_s: Rate
    capacity_bps: BitsPerSecond
    oper_up: bool


class QdiscSample(_Sample, frozen=True, tag="qdisc"):
    """Traffic-control state of one NIC's root qdisc: queue build-up means congestion."""

    kind: ClassVar[str] = "qdisc"
    reporter: Name
    nic: Name
    ts: UnixTime
    window_s: Window
    backlog_bytes: Rate
    backlog_packets: Rate
    drops_s: Rate


class RdmaSample(_Sample, frozen=True, tag="rdma"):
    """RDMA port counters (sysfs) as rates; data counters already converted from 4-byte
    words to bytes."""

    kind: ClassVar[str] = "rdma"
    reporter: Name
    device: Name  # e.g. mlx5_0
    port: Count
    ts: UnixTime
    window_s: Window
    tx_bytes_s: Rate
    rx_bytes_s: Rate
    cnp_sent_s: Rate  # np_cnp_sent: we were a congested receiver
    cnp_handled_s: Rate  # rp_cnp_handled: we were told to slow down
    ecn_marked_s: Rate  # np_ecn_marked_roce_packets
    xmit_wait_s: Rate  # port_xmit_wait ticks per second


Sample = RttSample | NicSample | QdiscSample | RdmaSample
SAMPLE_TYPES: dict[str, type[Sample]] = {
    cls.kind: cls for cls in (RttSample, NicSample, QdiscSample, RdmaSample)
}
