"""The run's stages that do not follow a request: background sources, faults and telemetry
samples.

:class:`SourceStages` is a part of :class:`netkv.sim.stages.Run`: it puts the seeded
schedules of :mod:`netkv.sim.sources` (and the inelastic hot spots of
:mod:`netkv.sim.fabric`) on the event queue, and handles their events: inelastic hot spots,
other tenants' elephants, weight loads at instance restarts, faults, and the telemetry
sampling instants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from netkv.core.topology import IntArray, Topology
from netkv.sim.events import EventQueue, Kind
from netkv.sim.fabric import INF, TENANT, WEIGHTS, Fabric, HotSpot, hot_spots
from netkv.sim.runconfig import RunConfig
from netkv.sim.scenario import ScenarioSpec, TelemetrySection
from netkv.sim.sources import (
    Episode,
    FaultEpisode,
    fault_episodes,
    restart_times,
    tenant_episodes,
)
from netkv.sim.telemetry import BackgroundHistory, NicByteView, NicRateView, bound_nic_rates

if TYPE_CHECKING:
    from netkv.sim.simulation import Simulation


class SourceStages:
    """Background sources, faults and samples of one run (a mixin of ``Run``)."""

    config: RunConfig
    spec: ScenarioSpec
    topo: Topology
    fabric: Fabric
    events: EventQueue
    history: BackgroundHistory
    nic_view: NicRateView
    byte_view: NicByteView
    tel: TelemetrySection
    horizon: float
    nic_first: IntArray
    nic_width: IntArray
    prefill_instances: list[int]
    decode_instances: list[int]
    sim: Simulation

    def reallocate(self) -> None:
        raise NotImplementedError

    def schedule_sources(self, seed: int) -> None:
        """Push every source's, fault's and sample's events (in this order, before the
        arrivals: equal times run in push order)."""
        topo, config, events, horizon = self.topo, self.config, self.events, self.horizon
        bg = self.spec.background
        self.elastic = bg.model == "elastic"
        self.spots: list[HotSpot] = (
            hot_spots(topo, bg, horizon + 3300.0, seed, config.congestion)
            if not self.elastic else [])
        for i, s in enumerate(self.spots):
            events.push(s.start_s, Kind.BACKGROUND, i, 1)
            events.push(s.end_s, Kind.BACKGROUND, i, -1)
        self.tenants: list[Episode] = (
            tenant_episodes(topo, bg.tenants, horizon, seed, intensity=config.congestion,
                            dwell_scale=config.dwell_scale) if self.elastic else [])
        self.tenant_cap = bg.tenants.flow_gbps * 1e9 / 8.0
        for i, e in enumerate(self.tenants):
            events.push(e.start_s, Kind.TENANT, i, 1)
            events.push(e.end_s, Kind.TENANT, i, -1)
        everyone = self.prefill_instances + self.decode_instances
        self.restarts = [(t, everyone[i]) for t, i in restart_times(
            bg.weight_loads.per_hour if self.elastic else 0.0, horizon, len(everyone), seed)]
        for i, (t, _) in enumerate(self.restarts):
            events.push(t, Kind.WEIGHTS, i)
        self.faults: list[FaultEpisode] = fault_episodes(self.spec.faults, topo, self.fabric,
                                                         horizon)
        for i, f in enumerate(self.faults):
            events.push(f.start_s, Kind.FAULT, i, 1)
            events.push(f.end_s, Kind.FAULT, i, -1)
        k = 0
        while k * self.tel.interval_s <= horizon + self.tel.delay_s:
            events.push(k * self.tel.interval_s, Kind.SAMPLE, k)
            k += 1

    # -- the handlers -------------------------------------------------------------------------
    def background(self, now: float, i: int, sign: int) -> None:
        """Inelastic hot spots (the sensitivity model)."""
        s = self.spots[i]
        fabric = self.fabric
        fabric.advance(now)
        fabric.set_background(s.link, sign * s.load)
        if fabric.flows:
            self.reallocate()

    def tenant(self, now: float, i: int, sign: int) -> None:
        """Another tenant's elephants on one link start (+1) or stop (-1)."""
        e = self.tenants[i]
        fabric = self.fabric
        fabric.advance(now)
        for j in range(e.flows):
            if sign > 0:
                phys = fabric.resolve((e.link,), i, j)
                fabric.add(i, phys, INF, kind=TENANT, sub=j, cap=self.tenant_cap,
                           physical=True)
            else:
                fabric.remove((TENANT, i, j))
        self.reallocate()

    def weights(self, now: float, i: int, _: int) -> None:
        """An instance (re)starts: its weights come from storage behind the core, striped
        over its NICs."""
        inst = self.restarts[i][1]
        h = int(self.topo.instance_host[inst])
        links = tuple(int(x) for x in self.topo.down_chain[h, ::-1])
        width = int(self.nic_width[inst])
        fabric = self.fabric
        fabric.advance(now)
        for j in range(width):
            phys = fabric.resolve(links, i, j, nic_dst=int(self.nic_first[inst]), dst_host=h)
            fabric.add(i, phys, self.sim.scenario.weights_bytes / width, kind=WEIGHTS, sub=j,
                       physical=True)
        self.reallocate()

    def fault(self, now: float, i: int, sign: int) -> None:
        f = self.faults[i]
        fabric = self.fabric
        fabric.advance(now)
        if f.skew_host >= 0:
            if sign > 0:
                fabric.skewed.add(f.skew_host)
            else:
                fabric.skewed.discard(f.skew_host)
            return
        fabric.scale_capacity(f.phys, f.factor if sign > 0 else 1.0)
        self.nic_view.record(now, bound_nic_rates(self.topo, fabric, self.nic_first,
                                                  self.nic_width))
        if fabric.flows:
            self.reallocate()

    def sample(self, now: float, k: int, _: int) -> None:
        """What the link counters show at a sampling instant."""
        self.history.record(now, self.fabric.unavailable(self.tel.own_flows))
        self.byte_view.sample(now)
