"""Ethernet NIC counters over netlink, as per-second rates.

Each read asks the kernel for ``RTM_GETSTATS`` with only ``IFLA_STATS_LINK_64`` (the 64-bit
``rtnl_link_stats64`` counters) of each configured interface through
:class:`~netkv_agent.rtnetlink.RouteSocket`: a few hundred bytes per interface, far cheaper
to parse than a full ``RTM_GETLINK`` dump, which matters for an agent that must stay under
1% of a core. Interface names are resolved to indexes once and
again every ``RESOLVE_S`` or when an interface vanishes.
:class:`~netkv_agent.counters.RateTracker` differences consecutive reads (wraps and resets
handled there). Drops are ``rx_dropped + tx_dropped`` and errors
``rx_errors + tx_errors``: both directions, because either one means lost KV bytes. An
interface that is re-created (new ifindex) starts a fresh baseline.

Link speed comes from ``nic_speed_gbps`` in the config when given (virtual interfaces and
namespaces have no meaningful sysfs speed), else ``<sysfs_net_root>/<if>/speed`` (Mb/s), else
0 (unknown; the oracle then uses the topology's nominal capacity).

How samples map to topology links is described in :mod:`netkv_agent.settings`: the fabric
NIC's tx is ``<host>/nic/up`` and its rx ``<host>/nic/down``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from netkv.telemetry.samples import NicSample
from netkv_agent.counters import RateTracker
from netkv_agent.rtnetlink import RouteSocket

log = structlog.get_logger(__name__)

STATS = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets", "rx_dropped", "tx_dropped",
         "rx_errors", "tx_errors")
SPEED_CACHE_S = 10.0
RESOLVE_S = 30.0
STATS_LINK_64 = 1  # filter mask bit of IFLA_STATS_LINK_64 in RTM_GETSTATS


def sysfs_speed_bytes_s(root: str | Path, ifname: str) -> float:
    """Link speed from ``<root>/<ifname>/speed`` (Mb/s) in bytes/s; 0 when unknown."""
    try:
        text = (Path(root) / ifname / "speed").read_text().strip()
        mbps = int(text)
    except (OSError, ValueError):
        return 0.0
    return mbps * 1e6 / 8 if mbps > 0 else 0.0


Reading = tuple[str, int, Mapping[str, int]]  # (interface, ifindex, counters)


@dataclass(slots=True)
class NicReader:
    """Reads counters of ``interfaces`` through an open :class:`RouteSocket`."""

    reporter: str
    interfaces: Sequence[str]
    speed_gbps: Mapping[str, float] = field(default_factory=dict)
    sysfs_root: str = "/sys/class/net"
    missing: int = 0
    index: dict[str, int] = field(default_factory=dict)  # resolved interface -> ifindex
    _resolved_at: float = -RESOLVE_S
    _trackers: dict[str, tuple[int, RateTracker]] = field(default_factory=dict)
    _speed: dict[str, tuple[float, float]] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)

    def speed_bytes_s(self, ifname: str, now: float) -> float:
        if ifname in self.speed_gbps:
            return self.speed_gbps[ifname] * 1e9 / 8
        cached = self._speed.get(ifname)
        if cached is not None and now - cached[1] < SPEED_CACHE_S:
            return cached[0]
        speed = sysfs_speed_bytes_s(self.sysfs_root, ifname)
        self._speed[ifname] = (speed, now)
        return speed

    def resets(self) -> int:
        return sum(t.resets for _, t in self._trackers.values())

    def resolve(self, route: RouteSocket, now: float, force: bool = False) -> None:
        """Map interface names to indexes (again after ``RESOLVE_S`` or when forced)."""
        if not force and now - self._resolved_at < RESOLVE_S:
            return
        self._resolved_at = now
        index: dict[str, int] = {}
        for name in self.interfaces:
            found = route.link_index(name)
            if found is not None:
                index[name] = found
        self.index = index

    def read(self, route: RouteSocket, wall: float | None = None) -> list[NicSample]:
        """One round: counters of every configured interface, as samples (none on the first
        round, which is the baseline)."""
        self.resolve(route, time.monotonic())
        readings: list[Reading] = []
        vanished = False
        for name, index in self.index.items():
            stats = route.link_stats64(index)
            if stats is None:
                vanished = True
                continue
            readings.append((name, index, stats))
        if vanished or len(self.index) < len(self.interfaces):
            self._resolved_at = -RESOLVE_S  # look the names up again next round
        return self.ingest(readings, time.monotonic(), time.time() if wall is None else wall)

    def ingest(self, readings: Sequence[Reading], now: float, wall: float) -> list[NicSample]:
        """Turn one round of readings into samples (split out so tests can feed crafted
        counters)."""
        wanted = set(self.interfaces)
        seen: set[str] = set()
        samples: list[NicSample] = []
        for name, index, values in readings:
            if name not in wanted:
                continue
            seen.add(name)
            entry = self._trackers.get(name)
            if entry is None or entry[0] != index:
                entry = (index, RateTracker())
                self._trackers[name] = entry
            result = entry[1].update(dict(values), now)
            if result is None:
                continue
            rates, window = result
            samples.append(NicSample(
                reporter=self.reporter, nic=name, ts=wall, window_s=window,
                tx_bytes_s=rates["tx_bytes"], rx_bytes_s=rates["rx_bytes"],
                tx_packets_s=rates["tx_packets"], rx_packets_s=rates["rx_packets"],
                drops_s=rates["rx_dropped"] + rates["tx_dropped"],
                errors_s=rates["rx_errors"] + rates["tx_errors"],
                speed_bytes_s=self.speed_bytes_s(name, now)))
        for name in wanted - seen:
            self.missing += 1
            if name not in self._warned:
                self._warned.add(name)
                log.warning("interface not found", interface=name, reporter=self.reporter)
        return samples
