"""Flows over physical links, with max-min fair rates, ECMP members and background traffic.

The topology's links are what a scheduler sees (a host's NIC bundle, a leaf's uplink bundle);
the fabric splits some of them into the *physical* links they are made of:

* a host's NIC link into ``nics`` members (one per NIC, ``capacity / nics`` each); a KV
  transfer is striped over the NICs its instance is bound to, one subflow per NIC, as
  Mooncake's transfer engine and NIXL do, so a slow or failed NIC slows every transfer
  striped over it;
* a leaf's uplink and downlink bundles into ``spines`` members (one per spine); every
  subflow is hashed onto one spine (the same for its up and down hop), so subflows and
  other tenants' elephants collide, as ECMP does (Alibaba HPN, SIGCOMM'24).

Rates are max-min fair (progressive filling, with per-flow rate caps), recomputed only when a
flow starts or ends, a capacity changes or the background changes, so a run costs
O(events x active flows). Background comes in two models:

* **elastic** (the default): other traffic is made of flows too (other tenants' elephants,
  KV-store prefix fetches, weight loads) that share links max-min fairly with KV flows, as
  RDMA (DCQCN, receiver-driven) and TCP congestion control make them;
* **inelastic** (a labelled sensitivity knob only): a hot spot takes a fixed share of a link
  (at most ``MAX_BACKGROUND``) and never yields; KV flows share the rest.

``delivered_bytes`` integrates the KV flows' rates, so tests can check that every KV byte is
delivered exactly once. With ``count_nics`` the fabric also keeps what a NIC's byte counters
(``tx_bytes``/``rx_bytes`` in ``rtnl_link_stats64``) count: ``nic_bytes[m]``, the bytes every
flow (KV, prefix fetches, weight loads, other tenants) has moved over physical NIC member
``m``, integrated exactly like ``delivered_bytes``.

Size (~420 lines, one concept): the flows, their physical members and the max-min rates
share one state that every change re-solves (:mod:`netkv.sim.waterfill` holds the solver).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from netkv.core.topology import FloatArray, IntArray, LinkKind, Topology
from netkv.sim.scenario import BackgroundSection
from netkv.sim.waterfill import fill_vectorised

MAX_BACKGROUND = 0.99
SMALL = 12  # up to this many flows the dict-based filling beats numpy
DEAD = 0.05  # a member below this share of its capacity is skipped by new flows (re-route)
KV, TENANT, FETCH, WEIGHTS = range(4)  # flow kinds
INF = float("inf")


class Flow:
    __slots__ = ("cap", "key", "kind", "links", "mark", "nics", "rate", "remaining",
                 "request", "total")

    def __init__(self, key: tuple[int, int, int], links: tuple[int, ...], nbytes: float,
                 cap: float = INF) -> None:
        self.key = key
        self.kind, self.request, _ = key
        self.links = links
        self.total = nbytes
        self.remaining = nbytes
        self.rate = 0.0
        self.cap = cap
        self.mark = -1
        self.nics: tuple[int, ...] = ()  # its NIC members, when the fabric counts NIC bytes


@dataclass(frozen=True, slots=True)
class HotSpot:
    """An inelastic hot spot (the sensitivity model): a share of one link for a while."""

    start_s: float
    end_s: float
    link: int
    load: float  # fraction of the link's capacity


def hot_spots(topology: Topology, spec: BackgroundSection, horizon_s: float,
              seed: int, intensity: float = 1.0) -> list[HotSpot]:
    """The inelastic schedule: Poisson starts (rate chosen so that on average
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


def mix(*values: int) -> int:
    """A deterministic 32-bit hash of small integers (ECMP's flow hash stand-in)."""
    h = 0x811C9DC5
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFF)) * 0x01000193) & 0xFFFFFFFF
        h ^= h >> 15
    return h


class Fabric:
    """Active flows and background on the physical links under ``topology``'s links.

    ``nics`` and ``spines`` of 1 keep one physical link per topology link (same indices).
    """

    def __init__(self, topology: Topology, *, nics: int = 1, spines: int = 1,
                 salt: int = 0, count_nics: bool = False) -> None:
        self.topology = topology
        self.salt = salt
        self.count_nics = count_nics
        n = topology.n_links
        members: list[IntArray] = []
        owner: list[int] = []
        caps: list[float] = []
        for i, link in enumerate(topology.links):
            width = 1
            if link.kind in (LinkKind.NIC_UP, LinkKind.NIC_DOWN):
                width = nics
            elif link.kind in (LinkKind.LEAF_UP, LinkKind.LEAF_DOWN):
                width = spines
            ids = np.arange(len(owner), len(owner) + width, dtype=np.int64)
            members.append(ids)
            owner.extend([i] * width)
            caps.extend([float(topology.capacity[i]) / width] * width)
        self.members = members
        self.owner: IntArray = np.array(owner, dtype=np.int64)
        self.nominal: FloatArray = np.array(caps, dtype=np.float64)
        self.capacity: FloatArray = self.nominal.copy()  # after faults
        self.n_phys = len(owner)
        self.background: FloatArray = np.zeros(n, dtype=np.float64)  # inelastic, per link
        self.flows: dict[tuple[int, int, int], Flow] = {}
        self.now = 0.0
        self.delivered_bytes = 0.0
        self.version = 0
        self.skewed: set[int] = set()  # hosts whose transfers all use their first NIC
        self._kinds = [link.kind for link in topology.links]
        self._member_lists = [[int(x) for x in ids] for ids in members]
        self._alive_cache: dict[int, list[int]] = {}
        self._owner_list = owner
        # Python-float mirrors of capacity and background for the small water-filling
        # (indexing a numpy array per link costs more than the arithmetic); kept in step by
        # scale_capacity and set_background, the only writers.
        self._cap_list: list[float] = self.capacity.tolist()
        self._bg_list: list[float] = self.background.tolist()
        self._nominal_list: list[float] = topology.capacity.tolist()
        nic_kinds = (LinkKind.NIC_UP, LinkKind.NIC_DOWN)
        self._is_nic = [self._kinds[o] in nic_kinds for o in owner]
        self.nic_bytes: list[float] = [0.0] * self.n_phys  # per physical link (NICs only)

    # -- background and faults -----------------------------------------------------------
    def set_background(self, link: int, delta_load: float) -> None:
        """Inelastic model: add (or remove, negative) a share of ``link``'s capacity."""
        cap = float(self.topology.capacity[link])
        self.background[link] = max(self.background[link] + delta_load * cap, 0.0)
        self._bg_list[link] = float(self.background[link])

    def scale_capacity(self, phys: IntArray, factor: float) -> None:
        """Faults: set physical links to ``factor`` of their nominal capacity."""
        self.capacity[phys] = self.nominal[phys] * max(factor, 1.0 - MAX_BACKGROUND)
        self._cap_list = self.capacity.tolist()
        self._alive_cache.clear()

    # -- paths -----------------------------------------------------------------------------
    def _alive(self, link: int) -> list[int]:
        """Members of topology ``link`` new flows may use (cached until a capacity changes)."""
        hit = self._alive_cache.get(link)
        if hit is None:
            ids = self._member_lists[link]
            ok = [i for i in ids if self.capacity[i] >= DEAD * self.nominal[i]]
            hit = self._alive_cache[link] = ok or ids
        return hit

    def resolve(self, links: tuple[int, ...], key: int, j: int, *, nic_src: int = -1,
                nic_dst: int = -1, src_host: int = -1, dst_host: int = -1) -> tuple[int, ...]:
        """Physical links of subflow ``j`` of flow ``key`` over topology ``links``.

        NIC bundles: member ``nic_src + j`` at the sender, ``nic_dst + j`` at the receiver
        (bound NICs), or a hashed member when the offset is -1; a skewed host uses its first
        NIC. Leaf bundles: one hashed spine for both hops. Dead members are skipped.
        """
        out: list[int] = []
        spine = -1
        for link in links:
            ids = self._member_lists[link]
            if len(ids) == 1:
                out.append(ids[0])
                continue
            kind = self._kinds[link]
            alive = self._alive(link)
            if kind is LinkKind.NIC_UP or kind is LinkKind.NIC_DOWN:
                up = kind is LinkKind.NIC_UP
                offset, jj = (nic_src if up else nic_dst), j
                skewed = src_host if up else dst_host
                if skewed >= 0 and skewed in self.skewed:
                    offset, jj = 0, 0
                if offset < 0:
                    out.append(alive[mix(key, j, link, self.salt) % len(alive)])
                else:
                    want = ids[(offset + jj) % len(ids)]
                    out.append(want if want in alive else alive[(offset + jj) % len(alive)])
            else:
                if spine < 0:
                    spine = mix(key, j, self.salt)
                out.append(alive[spine % len(alive)])
        return tuple(out)

    # -- flows -----------------------------------------------------------------------------
    def add(self, request: int, links: tuple[int, ...], nbytes: float, *, kind: int = KV,
            sub: int = 0, cap: float = INF, physical: bool = False) -> Flow:
        """Start a flow (subflow ``sub``) over topology ``links`` (``physical``: already
        resolved to physical links)."""
        phys = links if physical else self.resolve(links, request, sub)
        flow = Flow((kind, request, sub), phys, nbytes, cap)
        if self.count_nics:
            flow.nics = tuple(link for link in phys if self._is_nic[link])
        self.flows[flow.key] = flow
        return flow

    def remove(self, key: tuple[int, int, int]) -> None:
        """Stop a flow (an elephant whose ON period ended)."""
        self.flows.pop(key, None)

    def advance(self, now: float) -> None:
        dt = now - self.now
        if dt > 0:
            counters = self.nic_bytes
            for f in self.flows.values():
                if f.remaining == INF:  # an elephant: moves at its rate for ever
                    if f.nics:
                        for link in f.nics:
                            counters[link] += f.rate * dt
                    continue
                moved = min(f.rate * dt, f.remaining)
                f.remaining -= moved
                if f.kind == KV:
                    self.delivered_bytes += moved
                if f.nics:
                    for link in f.nics:
                        counters[link] += moved
        self.now = max(now, self.now)

    def nic_bytes_at(self, now: float) -> FloatArray:
        """:attr:`nic_bytes` as they will read at ``now`` (not before :attr:`now`), without
        advancing the flows (so taking a sample changes no flow's arithmetic)."""
        out: FloatArray = np.array(self.nic_bytes, dtype=np.float64)
        dt = now - self.now
        if dt > 0:
            for f in self.flows.values():
                if f.nics:
                    moved = min(f.rate * dt, f.remaining)
                    for link in f.nics:
                        out[link] += moved
        return out

    def finished(self) -> list[Flow]:
        """Remove and return the flows with (numerically) nothing left to send."""
        done = [f for f in self.flows.values()
                if f.remaining <= max(1.0, 1e-9 * f.total)]
        for f in done:
            if f.kind == KV:
                self.delivered_bytes += f.remaining
            for link in f.nics:
                self.nic_bytes[link] += f.remaining
            f.remaining = 0.0
            del self.flows[f.key]
        return done

    def reallocate(self) -> float:
        """Max-min fair rates by progressive filling (water-filling) over the links the flows
        use, vectorised; a flow's cap acts as a private link. Returns the next completion
        time of a finite flow.

        Each round either freezes every unfrozen flow whose cap is below the lowest fair
        share of any link (a flow held below a link's share only raises that share for the
        others), or freezes the flows of the link with the lowest fair share at that share.
        """
        self.version += 1
        flows = list(self.flows.values())
        if not flows:
            return INF
        if len(flows) <= SMALL:
            self._fill_small(flows)
        else:
            self._fill(flows)
        soonest = INF
        for f in flows:
            if f.remaining < INF and f.rate > 0:
                soonest = min(soonest, f.remaining / f.rate)
        return self.now + soonest

    def _fill(self, flows: list[Flow]) -> None:
        """Water-filling for many flows (:mod:`netkv.sim.waterfill`)."""
        fill_vectorised(flows, self.free)

    def free(self, links: IntArray) -> FloatArray:
        """What physical ``links`` leave to flows: capacity less the inelastic background
        (which never takes more than ``MAX_BACKGROUND``)."""
        cap = self.capacity[links]
        owner = self.owner[links]
        taken = self.background[owner] * cap / self.topology.capacity[owner]
        out: FloatArray = np.maximum(cap - taken, cap * (1.0 - MAX_BACKGROUND))
        return out

    def _fill_small(self, flows: list[Flow]) -> None:
        """The same water-filling with dicts: faster than numpy for a handful of flows."""
        mark = self.version
        on_link: dict[int, list[Flow]] = {}
        for f in flows:
            for link in f.links:
                on_link.setdefault(link, []).append(f)
        owner, caps, bg, nominal = (self._owner_list, self._cap_list, self._bg_list,
                                    self._nominal_list)
        left: dict[int, float] = {}
        for link in on_link:
            cap = caps[link]
            o = owner[link]
            taken = bg[o] * cap / nominal[o] if bg[o] else 0.0
            left[link] = max(cap - taken, cap * (1.0 - MAX_BACKGROUND))
        count = {link: len(fs) for link, fs in on_link.items()}
        capped = sorted((f for f in flows if f.cap < INF), key=lambda f: f.cap)
        ci = 0
        while count:
            link, lowest = -1, INF
            for k, c in count.items():  # min(count, key=share): the first lowest share
                s = left[k] / c
                if link < 0 or s < lowest:
                    link, lowest = k, s
            share = max(lowest, 0.0)
            while ci < len(capped) and capped[ci].mark == mark:
                ci += 1
            group = on_link[link]
            if ci < len(capped) and capped[ci].cap < share:
                group = [capped[ci]]
                share = capped[ci].cap
            for f in group:
                if f.mark == mark:
                    continue
                f.mark = mark
                f.rate = share
                for other in f.links:
                    left[other] -= share
                    count[other] -= 1
                    if count[other] == 0:
                        del count[other]

    # -- what telemetry and the ground truth see ------------------------------------------
    def link_load(self) -> tuple[FloatArray, FloatArray]:
        """Per topology link: the rate of background flows and of KV flows now."""
        n = self.topology.n_links
        bg = np.zeros(n)
        own = np.zeros(n)
        owner = self._owner_list
        for f in self.flows.values():
            target = own if f.kind == KV else bg
            for link in f.links:
                target[owner[link]] += f.rate
        return bg, own

    def lost_capacity(self) -> FloatArray:
        """Per topology link: capacity lost to faults (nominal minus effective)."""
        lost = np.bincount(self.owner, weights=self.nominal - self.capacity,
                           minlength=self.topology.n_links)
        out: FloatArray = lost.astype(np.float64)
        return out

    def unavailable(self, include_own: bool) -> FloatArray:
        """What link counters show as not free per topology link: lost capacity, inelastic
        background, background flows' rates and (``include_own``) the KV flows' rates."""
        bg, own = self.link_load()
        out: FloatArray = self.lost_capacity() + self.background + bg
        if include_own:
            out = out + own
        return out

    def truth_unavailable(self) -> FloatArray:
        """Per topology link: capacity minus what a new flow could get now, ignoring the KV
        flows (the policy counts its own through its bookings). On a physical link with
        ``k`` elastic background flows a newcomer gets ``max(free, capacity / (k + 1))``."""
        n_phys = self.n_phys
        rate = np.zeros(n_phys)
        count = np.zeros(n_phys)
        for f in self.flows.values():
            if f.kind == KV:
                continue
            for link in f.links:
                rate[link] += f.rate
                count[link] += 1
        inel = (self.background / np.maximum(self.topology.capacity, 1.0))[self.owner]
        usable = self.capacity * (1.0 - np.minimum(inel, MAX_BACKGROUND))
        free = np.maximum(usable - rate, 0.0)
        share = np.where(count > 0, np.maximum(free, usable / (count + 1.0)), free)
        got = np.bincount(self.owner, weights=share, minlength=self.topology.n_links)
        out: FloatArray = np.maximum(self.topology.capacity - got, 0.0)
        return out


def nic_offsets(topology: Topology, nics: int) -> tuple[IntArray, IntArray]:
    """Per instance: the first NIC it is bound to and how many (GPUs in host order, NICs
    spread evenly over the GPUs: DGX-style one NIC per GPU, or one per GPU pair)."""
    first = np.zeros(len(topology.instances), dtype=np.int64)
    width = np.ones(len(topology.instances), dtype=np.int64)
    used: dict[str, int] = {}
    for i, inst in enumerate(topology.instances):
        host = topology.hosts[topology.host_index[inst.host]]
        gpu0 = used.get(inst.host, 0)
        used[inst.host] = gpu0 + inst.gpus
        per_gpu = nics / max(host.gpus, 1)
        first[i] = math.floor(gpu0 * per_gpu) % max(nics, 1)
        width[i] = max(round(inst.gpus * per_gpu), 1)
    return first, width
