"""Turns accepted samples into congestion-map updates.

* ``NicSample`` from a host: transmit rate -> ``<host>/nic/up``, receive -> ``<host>/nic/down``
  (summed over the host's NICs; a reported ``speed_bytes_s`` below the topology's capacity
  lowers it: a NIC that negotiated a lower rate).
* ``RdmaSample``: RDMA traffic bypasses the kernel's netdev counters on RoCE NICs, so the
  NIC link's utilisation is the larger of the netdev sum and the RDMA sum.
* ``NicSample`` from a switch agent (reporter = a leaf or pod, ``nic`` = ``up``/``down``):
  ``tx_bytes_s`` is that directed link's utilisation.
* ``QdiscSample``: backlog / capacity is queueing delay on the NIC's up link.
* ``RttSample``: the pair's smoothed RTT, min RTT, p99 and loss ratio.

Sample timestamps are clamped to the oracle's clock, so an agent with a fast clock cannot
keep its links "fresh" forever. Shared links without switch telemetry are inferred from RTT
inflation by :meth:`CongestionMap.localise_inflation` when the map is published.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from netkv.core.congestion import CongestionMap, MapParams
from netkv.core.topology import Topology
from netkv.telemetry.samples import NicSample, QdiscSample, RdmaSample, RttSample, Sample

# (tx bytes/s, rx bytes/s, speed bytes/s, ts) per NIC or RDMA port
_Rates = tuple[float, float, float, float]


class MapBuilder:
    """Owns the live :class:`CongestionMap` and the per-NIC state needed to fill it."""

    def __init__(self, topology: Topology, params: MapParams,
                 clock: Callable[[], float] = time.time) -> None:
        self.topology = topology
        self.clock = clock
        self.map = CongestionMap(topology, params, clock)
        self._nics: dict[int, dict[str, _Rates]] = {}
        self._rdma: dict[int, dict[tuple[str, int], _Rates]] = {}
        self.changed = False
        self.changed_ts = 0.0  # oracle time of the first change not yet published

    def seed(self, cmap: CongestionMap) -> None:
        """Continue from a published map (a new leader starts from its predecessor's)."""
        cmap.clock = self.clock
        cmap.params = self.map.params
        self.map = cmap

    def _mark(self, now: float) -> None:
        if not self.changed:
            self.changed = True
            self.changed_ts = now

    def apply(self, agent: str, samples: tuple[Sample, ...], now: float) -> None:
        """Apply one accepted batch (ownership already checked)."""
        topo = self.topology
        host = topo.host_index.get(agent)
        if host is not None:
            self.map.observe_host(host, now)
        touched = False
        for s in samples:
            ts = min(s.ts, now)
            if isinstance(s, RttSample):
                if s.sent > 0 and s.sent > s.lost and host is not None:
                    self.map.observe_rtt(host, topo.host_index[s.peer], srtt_s=s.srtt_s,
                                         min_s=s.min_s, p99_s=s.p99_s, loss=s.lost / s.sent,
                                         ts=ts)
                elif host is not None and s.sent > 0:  # everything lost: keep the old RTT
                    old = self.map.pairs.get(_key(host, topo.host_index[s.peer]))
                    if old is not None:
                        self.map.observe_rtt(host, topo.host_index[s.peer], srtt_s=old.srtt_s,
                                             min_s=old.min_s, p99_s=old.p99_s, loss=1.0, ts=ts)
            elif host is None:  # a switch agent: its own directed link
                if isinstance(s, NicSample):
                    link = topo.link_index[f"{agent}/{s.nic}"]
                    speed = min(s.speed_bytes_s, float(topo.capacity[link])) or None
                    self.map.observe_link(link, s.tx_bytes_s, ts, capacity_bytes_s=speed)
                elif isinstance(s, QdiscSample):
                    link = topo.link_index[f"{agent}/{s.nic}"]
                    self.map.observe_queue(link, s.backlog_bytes / self.map.capacity[link], ts)
            elif isinstance(s, NicSample):
                self._nics.setdefault(host, {})[s.nic] = (s.tx_bytes_s, s.rx_bytes_s,
                                                          s.speed_bytes_s, ts)
                touched = True
            elif isinstance(s, RdmaSample):
                self._rdma.setdefault(host, {})[(s.device, s.port)] = (
                    s.tx_bytes_s, s.rx_bytes_s, 0.0, ts)
                touched = True
            else:  # QdiscSample
                up = int(topo.up_chain[host, 0])
                self.map.observe_queue(up, s.backlog_bytes / self.map.capacity[up], ts)
        if touched and host is not None:
            self._refresh_nic(host, now)
        self._mark(now)

    def _refresh_nic(self, host: int, now: float) -> None:
        horizon = now - self.map.params.stale_s
        nics = [r for r in self._nics.get(host, {}).values() if r[3] >= horizon]
        rdma = [r for r in self._rdma.get(host, {}).values() if r[3] >= horizon]
        if not nics and not rdma:
            return
        ts = max(r[3] for r in nics + rdma)
        up, down = int(self.topology.up_chain[host, 0]), int(self.topology.down_chain[host, 0])
        # A reported link speed can only lower the declared capacity (a NIC that negotiated
        # a lower rate); shaping or policy limits below line rate live in the topology.
        speed = min(sum(r[2] for r in nics), float(self.topology.capacity[up])) or None
        tx = max(sum(r[0] for r in nics), sum(r[0] for r in rdma))
        rx = max(sum(r[1] for r in nics), sum(r[1] for r in rdma))
        self.map.observe_link(up, tx, ts, capacity_bytes_s=speed)
        self.map.observe_link(down, rx, ts, capacity_bytes_s=speed)


def _key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a <= b else (b, a)
