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

Each sample also says what the NIC can carry now and whether it is up:

* ``capacity_bps`` is the lowest of the rates known for the interface: ``nic_speed_gbps`` in
  the config (virtual interfaces and namespaces have no meaningful sysfs speed), the
  negotiated speed in ``<sysfs_net_root>/<if>/speed`` (Mb/s), and the rate of a ``tbf`` root
  qdisc (how the testbeds emulate a NIC that negotiated a lower rate, and how an operator caps
  one); 0 when none is known (the oracle then keeps the topology's nominal capacity). It is
  re-read at most every ``CAPACITY_CACHE_S``, so a rate changed at run time shows within a
  second or two.
* ``oper_up`` is the kernel's view (``IFF_UP`` and ``IFF_RUNNING`` on the interface, asked
  over rtnetlink in every read): a NIC whose carrier is gone or that was set down carries
  nothing, and the oracle treats its links as failed.

How samples map to topology links is described in :mod:`netkv_agent.settings`: the fabric
NIC's tx is ``<host>/nic/up`` and its rx ``<host>/nic/down``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from netkv.contracts.samples import NicSample
from netkv_agent.counters import RateTracker
from netkv_agent.rtnetlink import IFF_RUNNING, IFF_UP, RouteSocket

log = structlog.get_logger(__name__)

STATS = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets", "rx_dropped", "tx_dropped",
         "rx_errors", "tx_errors")
CAPACITY_CACHE_S = 1.0
RESOLVE_S = 30.0
STATS_LINK_64 = 1  # filter mask bit of IFLA_STATS_LINK_64 in RTM_GETSTATS


def sysfs_speed_bps(root: str | Path, ifname: str) -> float:
    """Negotiated link speed from ``<root>/<ifname>/speed`` (Mb/s) in bits/s; 0 when unknown
    (the file says -1 for a link that is down or has no speed). An empty ``root`` reads
    nothing (an agent whose interfaces are in another network namespace than its sysfs)."""
    if not str(root):
        return 0.0
    try:
        text = (Path(root) / ifname / "speed").read_text().strip()
        mbps = int(text)
    except (OSError, ValueError):
        return 0.0
    return mbps * 1e6 if mbps > 0 else 0.0


def lowest_rate(*rates_bps: float) -> float:
    """The lowest positive rate (bits/s), 0 when none is known."""
    known = [r for r in rates_bps if r > 0]
    return min(known) if known else 0.0


# (interface, ifindex, counters, capacity bits/s, operationally up)
Reading = tuple[str, int, Mapping[str, int], float, bool]


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
    _capacity: dict[str, tuple[float, float]] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)

    def capacity_bps(self, route: RouteSocket | None, ifname: str, index: int,
                     now: float) -> float:
        """See the module docstring; cached for ``CAPACITY_CACHE_S``."""
        cached = self._capacity.get(ifname)
        if cached is not None and now - cached[1] < CAPACITY_CACHE_S:
            return cached[0]
        configured = self.speed_gbps.get(ifname, 0.0) * 1e9
        shaped = 0.0
        if route is not None:
            root = route.root_qdisc_info(index)
            shaped = root.rate_bytes_s * 8 if root is not None and root.kind == "tbf" else 0.0
        rate = lowest_rate(configured, sysfs_speed_bps(self.sysfs_root, ifname), shaped)
        self._capacity[ifname] = (rate, now)
        return rate

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
        now = time.monotonic()
        for name, index in self.index.items():
            stats = route.link_stats64(index)
            flags = route.link_flags(index) if stats is not None else None
            if stats is None or flags is None:
                vanished = True
                continue
            up = bool(flags & IFF_UP) and bool(flags & IFF_RUNNING)
            readings.append((name, index, stats, self.capacity_bps(route, name, index, now),
                             up))
        if vanished or len(self.index) < len(self.interfaces):
            self._resolved_at = -RESOLVE_S  # look the names up again next round
        return self.ingest(readings, now, time.time() if wall is None else wall)

    def ingest(self, readings: Sequence[Reading], now: float, wall: float) -> list[NicSample]:
        """Turn one round of readings into samples (split out so tests can feed crafted
        counters)."""
        wanted = set(self.interfaces)
        seen: set[str] = set()
        samples: list[NicSample] = []
        for name, index, values, capacity, up in readings:
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
                capacity_bps=capacity, oper_up=up))
        for name in wanted - seen:
            self.missing += 1
            if name not in self._warned:
                self._warned.add(name)
                log.warning("interface not found", interface=name, reporter=self.reporter)
        return samples
