"""RDMA port counters from sysfs, as per-second rates (InfiniBand and RoCE).

Layout read (the kernel ABI ``sysfs-class-infiniband``; the root is configurable so tests and
containers can point it at a tree of their own)::

    <root>/<device>/ports/<port>/link_layer        "InfiniBand" | "Ethernet" (RoCE)
    <root>/<device>/ports/<port>/rate              "400 Gb/sec (4X NDR)"
    <root>/<device>/ports/<port>/state             "4: ACTIVE"
    <root>/<device>/ports/<port>/counters/         IBTA PortCounters (IB and RoCE)
        port_xmit_data, port_rcv_data              data octets DIVIDED BY 4 (4-byte words)
        port_xmit_packets, port_rcv_packets, port_xmit_wait, port_xmit_discards, ...
    <root>/<device>/ports/<port>/hw_counters/      vendor counters (mlx5 names)
        np_cnp_sent, rp_cnp_handled, np_ecn_marked_roce_packets, rp_cnp_ignored,
        out_of_sequence, packet_seq_err, local_ack_timeout_err, out_of_buffer, ...

``port_xmit_data``/``port_rcv_data`` are multiplied by ``data_unit_bytes`` (4 as IBTA
defines; a RoCE driver known to count raw bytes can be configured with 1). Congestion
counters that a port lacks (an InfiniBand port has no CNP counters) read as absent and give a
rate of 0; that is reported in :attr:`RdmaReading.missing`. Resets (driver reload, counter
clear) and wraps are handled by :class:`~netkv_agent.counters.RateTracker`; 32-bit counters
(``port_xmit_wait`` and the mlx5 Q counters) are differenced with 32-bit wraparound, and a
32-bit counter stuck at its maximum (IBTA counters saturate) yields no rate.

The ``hw_counters`` values are cached by the driver for ``lifespan`` ms (10 by default), so
reads closer together than that may repeat a value; the agent reads every
``counter_interval_s`` (hundreds of ms), far above it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from netkv.contracts.samples import RdmaSample
from netkv_agent.counters import RateTracker

log = structlog.get_logger(__name__)

# counter name -> (sysfs subdirectory, width in bits)
COUNTERS: dict[str, tuple[str, int]] = {
    "port_xmit_data": ("counters", 64),
    "port_rcv_data": ("counters", 64),
    "port_xmit_packets": ("counters", 64),
    "port_rcv_packets": ("counters", 64),
    "port_xmit_wait": ("counters", 32),
    "port_xmit_discards": ("counters", 32),
    "port_rcv_errors": ("counters", 32),
    "np_cnp_sent": ("hw_counters", 64),
    "rp_cnp_handled": ("hw_counters", 64),
    "np_ecn_marked_roce_packets": ("hw_counters", 64),
    "rp_cnp_ignored": ("hw_counters", 64),
    "out_of_sequence": ("hw_counters", 32),
    "packet_seq_err": ("hw_counters", 32),
    "local_ack_timeout_err": ("hw_counters", 32),
    "out_of_buffer": ("hw_counters", 32),
}
CONGESTION = ("np_cnp_sent", "rp_cnp_handled", "np_ecn_marked_roce_packets", "port_xmit_wait")
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*Gb/sec")


def parse_rate(text: str) -> float:
    """``"400 Gb/sec (4X NDR)"`` -> bytes/s; 0 when unparseable."""
    match = _RATE.match(text)
    return float(match.group(1)) * 1e9 / 8 if match else 0.0


@dataclass(frozen=True, slots=True)
class RdmaReading:
    """One read of one port: raw counter values, plus what the port says about itself."""

    device: str
    port: int
    link_layer: str  # "InfiniBand" or "Ethernet" (RoCE)
    rate_bytes_s: float
    state: str
    values: dict[str, int]
    missing: tuple[str, ...]

    @property
    def is_roce(self) -> bool:
        return self.link_layer.lower() == "ethernet"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def discover_ports(root: str | Path, devices: Sequence[str] = ()) -> list[tuple[str, int]]:
    """``(device, port)`` pairs under ``root`` (only ``devices`` when given)."""
    base = Path(root)
    found: list[tuple[str, int]] = []
    try:
        names = sorted(p.name for p in base.iterdir())
    except OSError:
        return []
    for device in names:
        if devices and device not in devices:
            continue
        try:
            ports = sorted(int(p.name) for p in (base / device / "ports").iterdir()
                           if p.name.isdigit())
        except OSError:
            continue
        found += [(device, port) for port in ports]
    return found


def read_port(root: str | Path, device: str, port: int) -> RdmaReading | None:
    """Read one port's counters; ``None`` if the port directory is gone."""
    base = Path(root) / device / "ports" / str(port)
    if not base.is_dir():
        return None
    values: dict[str, int] = {}
    missing: list[str] = []
    for name, (sub, _) in COUNTERS.items():
        text = _read_text(base / sub / name)
        try:
            values[name] = int(text) if text is not None else -1
        except ValueError:
            values[name] = -1
        if values[name] < 0:
            del values[name]
            missing.append(name)
    return RdmaReading(
        device=device, port=port, link_layer=_read_text(base / "link_layer") or "InfiniBand",
        rate_bytes_s=parse_rate(_read_text(base / "rate") or ""),
        state=_read_text(base / "state") or "", values=values, missing=tuple(missing))


@dataclass(slots=True)
class RdmaReader:
    """Reads every configured port under ``root`` and produces :class:`RdmaSample`."""

    reporter: str
    root: str = "/sys/class/infiniband"
    devices: Sequence[str] = ()
    data_unit_bytes: int = 4
    _trackers: dict[tuple[str, int], RateTracker] = field(default_factory=dict)
    last: dict[tuple[str, int], RdmaReading] = field(default_factory=dict)

    @property
    def resets(self) -> int:
        return sum(t.resets for t in self._trackers.values())

    @property
    def wraps(self) -> int:
        return sum(t.wraps for t in self._trackers.values())

    def read(self, now: float | None = None, wall: float | None = None) -> list[RdmaSample]:
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        samples: list[RdmaSample] = []
        for device, port in discover_ports(self.root, self.devices):
            reading = read_port(self.root, device, port)
            if reading is None:
                continue
            self.last[(device, port)] = reading
            sample = self.ingest(reading, now, wall)
            if sample is not None:
                samples.append(sample)
        return samples

    def ingest(self, reading: RdmaReading, now: float, wall: float) -> RdmaSample | None:
        key = (reading.device, reading.port)
        tracker = self._trackers.get(key)
        if tracker is None:
            tracker = RateTracker(bits={k: bits for k, (_, bits) in COUNTERS.items()})
            self._trackers[key] = tracker
        result = tracker.update(reading.values, now)
        if result is None:
            return None
        rates, window = result
        unit = self.data_unit_bytes
        return RdmaSample(
            reporter=self.reporter, device=reading.device, port=reading.port, ts=wall,
            window_s=window,
            tx_bytes_s=rates.get("port_xmit_data", 0.0) * unit,
            rx_bytes_s=rates.get("port_rcv_data", 0.0) * unit,
            cnp_sent_s=rates.get("np_cnp_sent", 0.0),
            cnp_handled_s=rates.get("rp_cnp_handled", 0.0),
            ecn_marked_s=rates.get("np_ecn_marked_roce_packets", 0.0),
            xmit_wait_s=rates.get("port_xmit_wait", 0.0))
