"""Named background sources and faults: seeded schedules the run turns into events.

* :func:`tenant_episodes`: other tenants' elephants. Each eligible link is an alternating
  renewal process, ON and OFF dwell times lognormal (Benson et al., WREN'09 and IMC'10: ON/OFF
  periods lognormal, a minority of links hot at a time, the hot set changing); the OFF mean
  is set so that a link is ON ``hot_fraction`` of the time. While ON it carries a uniform
  ``flows_min..flows_max`` elephants (Alibaba HPN, SIGCOMM'24: a few bursty 400G flows).
* Prefix fetches and weight loads are driven by the run (the trace's reusable blocks; the
  restart schedule of :func:`restart_times`).
* :func:`fault_episodes`: a scenario's faults as (start, end) capacity changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from netkv.core.topology import IntArray, LinkKind, Topology
from netkv.errors import InputError
from netkv.sim.fabric import Fabric
from netkv.sim.scenario import FaultEntry, TenantSection


@dataclass(frozen=True, slots=True)
class Episode:
    """Tenant elephants on one topology link for a while."""

    start_s: float
    end_s: float
    link: int
    flows: int


def tenant_episodes(topology: Topology, spec: TenantSection, horizon_s: float, seed: int,
                    *, intensity: float = 1.0, dwell_scale: float = 1.0) -> list[Episode]:
    """ON periods per eligible link; ``intensity`` multiplies the hot fraction (at most 0.9),
    ``dwell_scale`` the dwell times (the hot-spot dwell sweep)."""
    kinds = {LinkKind(k) for k in spec.links}
    eligible = [i for i, link in enumerate(topology.links) if link.kind in kinds]
    frac = min(spec.hot_fraction * intensity, 0.9)
    if not eligible or frac <= 0:
        return []
    rng = np.random.default_rng((seed, 11))
    sigma = spec.dwell_sigma
    median_on = spec.dwell_median_s * dwell_scale
    mean_on = median_on * math.exp(sigma * sigma / 2.0)
    median_off = mean_on * (1.0 - frac) / frac / math.exp(sigma * sigma / 2.0)
    out: list[Episode] = []
    for link in eligible:
        # Start in the stationary state: ON with probability frac, with a fresh dwell.
        t = 0.0
        on = bool(rng.random() < frac)
        while t < horizon_s:
            dwell = float(rng.lognormal(math.log(median_on if on else median_off), sigma))
            if on:
                flows = int(rng.integers(spec.flows_min, spec.flows_max + 1))
                out.append(Episode(t, min(t + dwell, horizon_s), link, flows))
            t += dwell
            on = not on
    out.sort(key=lambda e: e.start_s)
    return out


def restart_times(per_hour: float, horizon_s: float, n_instances: int,
                  seed: int) -> list[tuple[float, int]]:
    """Poisson instance restarts (cluster-wide rate), each naming a uniformly drawn
    instance."""
    if per_hour <= 0 or n_instances == 0:
        return []
    rng = np.random.default_rng((seed, 13))
    out: list[tuple[float, int]] = []
    t = float(rng.exponential(3600.0 / per_hour))
    while t < horizon_s:
        out.append((t, int(rng.integers(n_instances))))
        t += float(rng.exponential(3600.0 / per_hour))
    return out


@dataclass(frozen=True, slots=True)
class FaultEpisode:
    """Physical links at ``factor`` of nominal capacity from ``start_s`` to ``end_s``
    (``skew_host`` >= 0: that host's transfers use its first NIC instead)."""

    start_s: float
    end_s: float
    phys: IntArray
    factor: float
    skew_host: int = -1


def fault_episodes(faults: tuple[FaultEntry, ...], topology: Topology, fabric: Fabric,
                   horizon_s: float) -> list[FaultEpisode]:
    out: list[FaultEpisode] = []
    for i, f in enumerate(faults):
        where = f"faults[{i}]"
        end = min(f.end_s, horizon_s)
        if f.kind in ("degraded_nic", "nic_skew"):
            if f.host not in topology.host_index:
                raise InputError(f"{where}.host", f"unknown host {f.host!r}")
            h = topology.host_index[f.host]
            if f.kind == "nic_skew":
                out.append(FaultEpisode(f.start_s, end, np.zeros(0, np.int64), 1.0, h))
                continue
            phys = _nic_members(topology, fabric, [h], f.nic, where)
            out.append(FaultEpisode(f.start_s, end, phys, f.factor))
        elif f.kind == "failed_rail":
            phys = _nic_members(topology, fabric, list(range(topology.n_hosts)), f.nic, where)
            out.append(FaultEpisode(f.start_s, end, phys, 0.0))
        else:  # flap
            if f.link not in topology.link_index:
                raise InputError(f"{where}.link", f"unknown link {f.link!r}")
            ids = fabric.members[topology.link_index[f.link]]
            if f.member >= ids.shape[0]:
                raise InputError(f"{where}.member", f"link {f.link!r} has {ids.shape[0]} "
                                 "members")
            phys = ids[f.member:f.member + 1]
            t = f.start_s
            while t < end:
                out.append(FaultEpisode(t, min(t + f.period_s / 2.0, end), phys, f.factor))
                t += f.period_s
    return out


def _nic_members(topology: Topology, fabric: Fabric, hosts: list[int], nic: int,
                 where: str) -> IntArray:
    ids: list[int] = []
    for h in hosts:
        for link in (topology.up_chain[h, 0], topology.down_chain[h, 0]):
            members = fabric.members[int(link)]
            if nic >= members.shape[0]:
                raise InputError(f"{where}.nic", f"hosts have {members.shape[0]} NICs")
            ids.append(int(members[nic]))
    return np.array(ids, dtype=np.int64)
