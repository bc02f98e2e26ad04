"""The demo's emulated RDMA NICs: counters the real agents read, and a link made hot.

The demo runs on loopback, where a host has no fabric NIC and the machine no RDMA hardware. So
each demo agent is given an emulated HCA: a sysfs tree laid out exactly as the kernel's
``/sys/class/infiniband`` (``<root>/<host>/mlx5_0/ports/1/counters/port_xmit_data`` in 4-byte
words, ``rate``, ``state``, ``link_layer``), whose counters this module advances. The agents
read these files with their real RDMA reader and publish real samples through Redis; the oracle
builds the map from them as from any agent. Nothing is injected past the agents: the only
emulated part is the hardware counter, and it is labelled as such wherever the demo prints it.

Every port carries a steady background load (:data:`IDLE_SHARE` of line rate); during a hot
stretch one host's port receives at :data:`HOT_SHARE` of line rate, which is what a competing
transfer into that host (another tenant's job, a checkpoint restore) looks like from its NIC.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

DEVICE, PORT = "mlx5_0", 1
IDLE_SHARE = 0.02  # background load on every port (a choice: a quiet fabric)
HOT_SHARE = 0.97  # the hot port's receive load (a choice: saturated, not dead)
TICK_S = 0.1


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers never see a half-written counter


@dataclass
class EmulatedPort:
    """One host's emulated HCA port; counters in bytes, written in 4-byte words."""

    root: Path
    line_bytes_s: float
    tx_bytes: float = 0.0
    rx_bytes: float = 0.0

    @property
    def port_dir(self) -> Path:
        return self.root / DEVICE / "ports" / str(PORT)

    def create(self, gbps: float) -> None:
        (self.port_dir / "counters").mkdir(parents=True, exist_ok=True)
        _write(self.port_dir / "link_layer", "Ethernet\n")
        _write(self.port_dir / "state", "4: ACTIVE\n")
        _write(self.port_dir / "rate", f"{gbps:g} Gb/sec (emulated by netkv up --demo)\n")
        self.flush()

    def advance(self, dt: float, tx_share: float, rx_share: float) -> None:
        self.tx_bytes += tx_share * self.line_bytes_s * dt
        self.rx_bytes += rx_share * self.line_bytes_s * dt

    def flush(self) -> None:
        counters = self.port_dir / "counters"
        words_tx, words_rx = int(self.tx_bytes // 4), int(self.rx_bytes // 4)
        _write(counters / "port_xmit_data", f"{words_tx}\n")
        _write(counters / "port_rcv_data", f"{words_rx}\n")
        _write(counters / "port_xmit_packets", f"{words_tx // 1024}\n")
        _write(counters / "port_rcv_packets", f"{words_rx // 1024}\n")


@dataclass
class EmulatedFabric:
    """The emulated HCAs of every demo host, and which host's downlink is hot now."""

    root: Path
    hosts: list[str]
    gbps: float
    hot_host: str | None = None
    ports: dict[str, EmulatedPort] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for host in self.hosts:
            port = EmulatedPort(self.root / host, self.gbps * 1e9 / 8)
            port.create(self.gbps)
            self.ports[host] = port

    def sysfs_root(self, host: str) -> Path:
        return self.root / host

    def hot_link(self, host: str) -> str:
        return f"{host}/nic/down"

    def tick(self, dt: float) -> None:
        for host, port in self.ports.items():
            rx = HOT_SHARE if host == self.hot_host else IDLE_SHARE
            port.advance(dt, IDLE_SHARE, rx)
            port.flush()

    async def run(self) -> None:
        """Advance the counters every :data:`TICK_S` for the life of the mesh."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            await asyncio.to_thread(self.tick, now - last)
            last = now


__all__ = ["DEVICE", "PORT", "EmulatedFabric"]
