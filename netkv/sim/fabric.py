"""KV transfers as flows over directed links, with max-min fair rates and background load.

Rates are recomputed (progressive filling) only when a flow starts or ends or the background
changes, so a run costs O(events x active flows). Background hot spots are inelastic: they
take a fixed share of a link's capacity for their duration (at most 99%), and KV flows share
the rest max-min fairly. ``delivered_bytes`` integrates the rates, so tests can check that
every byte a flow was given is delivered exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from netkv.core.topology import FloatArray, LinkKind, Topology
from netkv.sim.scenario import BackgroundSection

MAX_BACKGROUND = 0.99


class Flow:
    __slots__ = ("links", "rate", "remaining", "request", "total")

    def __init__(self, request: int, links: tuple[int, ...], nbytes: float) -> None:
        self.request = request
        self.links = links
        self.total = nbytes
        self.remaining = nbytes
        self.rate = 0.0


@dataclass(frozen=True, slots=True)
class HotSpot:
    start_s: float
    end_s: float
    link: int
    load: float  # fraction of the link's capacity


def hot_spots(topology: Topology, spec: BackgroundSection, horizon_s: float,
              seed: int, intensity: float = 1.0) -> list[HotSpot]:
    """A seeded schedule: Poisson starts (rate chosen so that on average
    ``mean_hotspots * intensity`` are active), exponential durations, uniform loads, each on a
    uniformly chosen link of the configured kinds."""
    kinds = {LinkKind(k) for k in spec.links}
    eligible = [i for i, link in enumerate(topology.links) if link.kind in kinds]
    mean = spec.mean_hotspots * intensity
    if not eligible or mean <= 0:
        return []
    rng = np.random.default_rng(seed)
    rate = mean / spec.mean_duration_s
    spots: list[HotSpot] = []
    t = -spec.mean_duration_s * 3  # warm start: hot spots already running at time 0
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t >= horizon_s:
            break
        duration = float(rng.exponential(spec.mean_duration_s))
        load = float(rng.uniform(spec.min_load, spec.max_load))
        link = eligible[int(rng.integers(len(eligible)))]
        if t + duration > 0:
            spots.append(HotSpot(max(t, 0.0), t + duration, link, load))
    return spots


class Fabric:
    """Active KV flows and background load on the topology's directed links."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.capacity: FloatArray = topology.capacity
        self.background: FloatArray = np.zeros(topology.n_links, dtype=np.float64)
        self.flows: dict[int, Flow] = {}
        self.now = 0.0
        self.delivered_bytes = 0.0
        self.version = 0

    def set_background(self, link: int, delta_load: float) -> None:
        """Add (or remove, negative) a share of ``link``'s capacity taken by background."""
        self.background[link] = max(self.background[link] + delta_load * self.capacity[link],
                                    0.0)

    def available(self) -> FloatArray:
        """Per-link rate left for KV flows now."""
        out: FloatArray = np.maximum(self.capacity - self.background,
                                     self.capacity * (1.0 - MAX_BACKGROUND))
        return out

    def advance(self, now: float) -> None:
        dt = now - self.now
        if dt > 0:
            for f in self.flows.values():
                moved = f.rate * dt
                moved = min(moved, f.remaining)
                f.remaining -= moved
                self.delivered_bytes += moved
        self.now = max(now, self.now)

    def add(self, request: int, links: tuple[int, ...], nbytes: float) -> None:
        self.flows[request] = Flow(request, links, nbytes)

    def finished(self) -> list[Flow]:
        """Remove and return the flows with (numerically) nothing left to send."""
        done = [f for f in self.flows.values() if f.remaining <= max(1.0, 1e-9 * f.total)]
        for f in done:
            self.delivered_bytes += f.remaining
            f.remaining = 0.0
            del self.flows[f.request]
        return done

    def reallocate(self) -> float:
        """Max-min fair rates by progressive filling; returns the next completion time."""
        self.version += 1
        flows = list(self.flows.values())
        if not flows:
            return float("inf")
        on_link: dict[int, list[Flow]] = {}
        for f in flows:
            for link in f.links:
                on_link.setdefault(link, []).append(f)
        avail = self.available()
        left = {link: float(avail[link]) for link in on_link}
        count = {link: len(fs) for link, fs in on_link.items()}
        frozen: set[int] = set()
        while count:
            link = min(count, key=lambda k: left[k] / count[k])
            share = max(left[link] / count[link], 0.0)
            for f in on_link[link]:
                if f.request in frozen:
                    continue
                frozen.add(f.request)
                f.rate = share
                for other in f.links:
                    left[other] -= share
                    count[other] -= 1
                    if count[other] == 0:
                        del count[other]
        return self.now + min(f.remaining / f.rate if f.rate > 0 else float("inf")
                              for f in flows)
