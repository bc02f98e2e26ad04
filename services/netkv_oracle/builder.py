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
from collections.abc import Callable, Iterator

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
            self.map.observe_rtts(host, self._rtt_rows(host, rtts, now))
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

    def _rtt_rows(self, host: int, rtts: list[RttSample], now: float
                  ) -> Iterator[tuple[int, float, float, float, float, float]]:
        """(peer, srtt, min, p99, loss, ts) per window with probes. A window that lost
        everything keeps the pair's last RTT and reports full loss (nothing if the pair was
        never measured)."""
        index, pairs = self.topology.host_index, self.map.pairs
        for s in rtts:
            sent, lost = s.sent, s.lost
            if sent <= 0:
                continue
            peer = index[s.peer]
            ts = s.ts if s.ts < now else now
            if sent > lost:
                yield peer, s.srtt_s, s.min_s, s.p99_s, lost / sent, ts
                continue
            old = pairs.get((host, peer) if host <= peer else (peer, host))
            if old is not None:
                yield peer, old.srtt_s, old.min_s, old.p99_s, 1.0, ts

    def _refresh(self, link: int, now: float) -> None:
        horizon = now - self.map.params.stale_s
        fresh = [(k, v) for k, v in self._sources.get(link, {}).items() if v[2] >= horizon]
        if not fresh:
            return
        net = sum(v[0] for k, v in fresh if k[0] == "net")
        rdma = sum(v[0] for k, v in fresh if k[0] == "rdma")
        ts = max(v[2] for _, v in fresh)
        # A reported link speed can only lower the declared capacity (a NIC that negotiated
        # a lower rate); shaping or policy limits below line rate live in the topology.
        netdevs = [v for k, v in fresh if k[0] == "net"]
        speed = sum(v[1] for v in netdevs)
        capacity = min(speed, float(self.topology.capacity[link])) if speed > 0 else None
        up = any(v[3] for v in netdevs) if netdevs else None
        self.map.observe_link(link, max(net, rdma), ts, capacity_bytes_s=capacity, up=up)
