"""Turns accepted samples into congestion-map updates.

* ``NicSample``: the interface's transmit rate loads its ``tx`` link and its receive rate
  its ``rx`` link, as the agent's registration binds them (``links``; validated against the
  topology's owners), for host and switch agents alike (a leaf's uplink port loads
  ``<leaf>/up`` and ``<leaf>/down``). An unregistered host's interfaces load
  ``<host>/nic/up`` and ``/nic/down``; an unregistered switch is refused at the check.
  Several interfaces on one link add up; a reported ``capacity_bps`` below the topology's
  capacity lowers it (a NIC that negotiated a lower rate, or one shaped by a tbf), and a link
  whose interfaces all report ``oper_up = False`` is failed (no residual bandwidth).
* ``RdmaSample``: RDMA traffic bypasses the kernel's netdev counters on RoCE NICs, so a
  link's utilisation is the larger of its netdev sum and its RDMA sum.
* ``QdiscSample``: backlog / capacity is queueing delay on the interface's ``tx`` link.
* ``RttSample``: the pair's smoothed RTT, min RTT, p99 and loss ratio.

Sample timestamps are clamped to the oracle's clock, so an agent with a fast clock cannot
keep its links "fresh" forever. Shared links without switch telemetry are inferred from RTT
inflation by :func:`netkv.core.tomography.localise_inflation` when the map is published.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from netkv.contracts.samples import NicSample, QdiscSample, RdmaSample, RttSample, Sample
from netkv.core.congestion import CongestionMap, MapParams
from netkv.core.topology import Topology
from netkv_oracle.identity import Ownership

# per link: (source kind, source name) -> (bytes/s, capacity bytes/s, ts, up)
_Sources = dict[tuple[str, str], tuple[float, float, float, bool]]


class MapBuilder:
    """Owns the live :class:`CongestionMap` and the per-interface state needed to fill it."""

    def __init__(self, topology: Topology, params: MapParams,
                 clock: Callable[[], float] = time.time) -> None:
        self.topology = topology
        self.clock = clock
        self.map = CongestionMap(topology, params, clock)
        self._sources: dict[int, _Sources] = {}
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

    def apply(self, agent: str, samples: tuple[Sample, ...], now: float,
              ownership: Ownership) -> None:
        """Apply one accepted batch (ownership already checked)."""
        topo = self.topology
        host = topo.host_index.get(agent)
        if host is not None:
            self.map.observe_host(host, now)
        self.map.observe_agent(agent, now)
        touched: set[int] = set()
        rtts = [s for s in samples if type(s) is RttSample]
        if rtts and host is not None:
            self.map.observe_rtt_windows(host, rtts, now)
        for s in samples if len(rtts) < len(samples) else ():
            if type(s) is RttSample:
                continue
            ts = min(s.ts, now)
            if isinstance(s, NicSample):
                tx_link, rx_link = ownership.nic_links(agent, s.nic)
                for link, rate in ((tx_link, s.tx_bytes_s), (rx_link, s.rx_bytes_s)):
                    if link is not None:
                        self._sources.setdefault(link, {})[("net", s.nic)] = (
                            rate, s.capacity_bps / 8, ts, s.oper_up)
                        touched.add(link)
            elif isinstance(s, RdmaSample):
                tx_link, rx_link = ownership.rdma_links(agent, s.device, s.port)
                source = f"{s.device}/{s.port}"
                for link, rate in ((tx_link, s.tx_bytes_s), (rx_link, s.rx_bytes_s)):
                    if link is not None:
                        self._sources.setdefault(link, {})[("rdma", source)] = (
                            rate, 0.0, ts, True)
                        touched.add(link)
            elif isinstance(s, QdiscSample):  # backlog queues on the interface's tx link
                link = ownership.nic_links(agent, s.nic)[0]
                if link is not None:
                    self.map.observe_queue(link, s.backlog_bytes / self.map.capacity[link], ts)
        for link in touched:
            self._refresh(link, now)
        self._mark(now)

    def _refresh(self, link: int, now: float) -> None:
        """The link's state from its fresh sources: the larger of the netdev and the RDMA
        sums; the netdevs' summed speed can only lower the declared capacity (a NIC that
        negotiated a lower rate; shaping or policy limits below line rate live in the
        topology); up if any netdev is up (None: no netdev). One pass over the sources (a
        link has one or two), in their order, so the sums are the same floats as ``sum``."""
        sources = self._sources.get(link)
        if not sources:
            return
        horizon = now - self.map.params.stale_s
        net: float = 0
        rdma: float = 0
        speed: float = 0
        ts: float | None = None
        up: bool | None = None
        for (kind, _), (rate, capacity_bytes_s, at, is_up) in sources.items():
            if at < horizon:
                continue
            if ts is None or at > ts:
                ts = at
            if kind == "net":
                net += rate
                speed += capacity_bytes_s
                up = True if is_up else bool(up)
            else:
                rdma += rate
        if ts is None:
            return
        capacity = min(speed, float(self.topology.capacity[link])) if speed > 0 else None
        self.map.observe_link(link, max(net, rdma), ts, capacity_bytes_s=capacity, up=up)
