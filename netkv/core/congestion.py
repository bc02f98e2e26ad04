"""The congestion map: live per-link and per-pair network state, O(hosts + links).

The oracle service feeds it measurements; the scheduler and the simulator read it through the
:class:`~netkv.core.costmodel.CostOracle` protocol. Nothing here does I/O or encoding: the
snapshot codec is :mod:`netkv.contracts.snapshot`, RTT tomography :mod:`netkv.core.tomography`.

State (all arrays indexed like ``topology.links`` / ``topology.hosts``):

* per directed link: utilisation (bytes/s), capacity (bytes/s; the topology's unless an agent
  reported a link speed), queueing delay (s, from qdisc backlog or RTT tomography), the time
  of the last measurement and the confidence of its source (1 for counters, lower for
  inferred values);
* per probed host pair: smoothed RTT, min RTT, p99 and loss ratio (sparse: only the pairs the
  agents' pinglists probe, which grows about linearly with hosts);
* per host: when its agent was last heard from (liveness). Pairs involving a host whose
  agent went silent are ignored (the agent is the echo responder, so probe loss towards it
  says nothing about the network).

Pair estimates are composed on demand (never stored as an O(hosts²) matrix)::

    latency   = w * srtt/2 + (1-w) * sum(link latency + link queue)      (w = pair freshness)
    bandwidth = min over path links of  c * avail + (1-c) * prior         (c = link freshness)
    avail     = max(capacity - utilisation, capacity * min_share)
    seconds   = latency + bytes / (bandwidth * (1 - loss))

``prior`` is :meth:`Topology.nominal_share` (what each host can count on when every host
sends), so stale or missing data decays to the tier prior and is never reported as healthy
or idle. Freshness is 1 up to ``fresh_s`` after a measurement and falls linearly to 0 at
``stale_s`` (default: three publish intervals). ``min_share`` is the floor a new flow still
gets on a saturated link (TCP/DCQCN fair share against the flows already there).

API for consumers::

    cmap = CongestionMap(topology, params=MapParams(fresh_s=1, stale_s=3))
    cmap.observe_link(link, util_bytes_s, ts)         # producers (the oracle service)
    cmap.observe_rtt(src, dst, srtt_s=.., min_s=.., p99_s=.., loss=.., ts=..)
    cmap.estimate(src, dsts, nbytes)                  # CostOracle protocol -> CostEstimate
    cmap.cached(ttl_s)                                # the same, rows cached per source
    cmap.link_view(now)                               # a LinkStateOracle over the same state
    cmap.observe_agent("leaf0.1", ts)                 # per-agent freshness (``agents``)

``version``, ``created_ts`` and ``epoch`` describe the published copy the map is (set by the
publisher, or read from a snapshot); ``agents`` maps every agent id (hosts and switch agents)
to when it was last heard from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from netkv.core.costmodel import CostEstimate, LinkStateOracle
from netkv.core.paths import link_state_paths, pick
from netkv.core.topology import FloatArray, IntArray, Topology
from netkv.fields import bound

# Source confidences: counters measure the link itself; tomography infers it from paths.
COUNTER_CONFIDENCE = 1.0
INFERRED_CONFIDENCE = 0.5
NO_EPOCH = "0"  # a map no oracle term has published


@dataclass(frozen=True, slots=True)
class MapParams:
    """How fast measurements age and how a saturated link is modelled."""

    fresh_s: float = field(default=1.0, metadata=bound(gt=0))
    stale_s: float = field(default=3.0, metadata=bound(gt=0))
    min_share: float = field(default=0.1, metadata=bound(gt=0, le=1))
    max_loss: float = field(default=0.9, metadata=bound(ge=0, lt=1))

    def __post_init__(self) -> None:
        if self.stale_s <= self.fresh_s:
            raise ValueError(f"stale_s ({self.stale_s}) must exceed fresh_s ({self.fresh_s})")

    def freshness(self, age_s: FloatArray) -> FloatArray:
        """1 while fresh, linearly down to 0 at ``stale_s``; 0 for never-measured (inf)."""
        span = self.stale_s - self.fresh_s
        weight: FloatArray = np.clip((self.stale_s - age_s) / span, 0.0, 1.0)
        return weight


@dataclass(slots=True)
class PairState:
    """Round-trip measurements between two hosts (undirected: RTT is symmetric)."""

    srtt_s: float
    min_s: float
    p99_s: float
    loss: float
    ts: float


class RttWindow(Protocol):
    """One window of probes from a source host to ``peer`` (what an agent's RTT sample
    says; :class:`netkv.contracts.samples.RttSample` is one)."""

    @property
    def peer(self) -> str: ...
    @property
    def ts(self) -> float: ...
    @property
    def sent(self) -> int: ...
    @property
    def lost(self) -> int: ...
    @property
    def srtt_s(self) -> float: ...
    @property
    def min_s(self) -> float: ...
    @property
    def p99_s(self) -> float: ...


def _pair_key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a <= b else (b, a)


class CongestionMap:
    """Live network state over one topology; implements the ``CostOracle`` protocol."""

    def __init__(self, topology: Topology, params: MapParams | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.topology = topology
        self.params = params or MapParams()
        self.clock = clock
        n = topology.n_links
        self.prior: FloatArray = topology.nominal_share()
        self.capacity: FloatArray = topology.capacity.copy()
        self.link_up: np.ndarray[Any, np.dtype[np.bool_]] = np.ones(n, dtype=bool)
        self.util: FloatArray = np.zeros(n)
        self.queue_s: FloatArray = np.zeros(n)
        self.updated_ts: FloatArray = np.zeros(n)  # 0 = never measured
        self.source_confidence: FloatArray = np.zeros(n)
        self.host_seen_ts: FloatArray = np.zeros(topology.n_hosts)
        # Written only through observe_rtt / set_pair, which keep ``_peers`` (each
        # host's probed peers, for vectorised pair corrections) in step.
        self.pairs: dict[tuple[int, int], PairState] = {}
        self._peers: dict[int, dict[int, PairState]] = {}
        self.generation = 0  # bumped by every observation; cached views re-read on change
        self.version = 0  # set by the publisher / from a snapshot
        self.created_ts = 0.0
        self.epoch = NO_EPOCH  # the publishing oracle term's id (hex)
        self.agents: dict[str, float] = {}  # agent id -> last heard from (unix s)

    # -- producers ------------------------------------------------------------------------
    def observe_link(self, link: int, util_bytes_s: float, ts: float, *,
                     capacity_bytes_s: float | None = None, queue_s: float | None = None,
                     confidence: float = COUNTER_CONFIDENCE, up: bool | None = None) -> None:
        """Record a link's utilisation measured over a window ending at ``ts``.

        ``capacity_bytes_s`` is a reported rate (a NIC's negotiated speed or shaping rate): the
        link's capacity becomes ``min(nominal, reported)``, never more than the topology says.
        ``up=False`` marks the link failed (a NIC whose operational state is down): its
        residual bandwidth is 0 while the measurement is fresh, never healthy.
        Older measurements than the one held are ignored (streams may be read out of order
        across agents after a failover).
        """
        if ts < self.updated_ts[link]:
            return
        self.generation += 1
        self.util[link] = util_bytes_s
        if capacity_bytes_s:
            self.capacity[link] = min(capacity_bytes_s, float(self.topology.capacity[link]))
        if up is not None:
            self.link_up[link] = up
        if queue_s is not None:
            self.queue_s[link] = queue_s
        self.updated_ts[link] = ts
        self.source_confidence[link] = confidence

    def observe_queue(self, link: int, queue_s: float, ts: float) -> None:
        """Queueing delay on a link (tc backlog / capacity); does not refresh utilisation."""
        if ts >= self.updated_ts[link] - self.params.stale_s:
            self.generation += 1
            self.queue_s[link] = queue_s

    def observe_rtt(self, src: int, dst: int, *, srtt_s: float, min_s: float, p99_s: float,
                    loss: float, ts: float) -> None:
        key = _pair_key(src, dst)
        old = self.pairs.get(key)
        if old is not None and ts < old.ts:
            return
        floor = min(min_s, old.min_s) if old is not None and old.min_s > 0 else min_s
        self.set_pair(src, dst, PairState(srtt_s, floor, p99_s, loss, ts))

    def observe_rtts(self, src: int,
                     rows: Iterable[tuple[int, float, float, float, float, float]]) -> None:
        """:meth:`observe_rtt` for many peers of one source: rows of ``(dst, srtt_s, min_s,
        p99_s, loss, ts)``. The ingest hot path: a pair already known is updated in place
        (every index of it sees the change), a new one goes through :meth:`set_pair`."""
        pairs = self.pairs
        for dst, srtt_s, min_s, p99_s, loss, ts in rows:
            key = (src, dst) if src <= dst else (dst, src)
            old = pairs.get(key)
            if old is None:
                self.set_pair(src, dst, PairState(srtt_s, min_s, p99_s, loss, ts))
                continue
            if ts < old.ts:
                continue
            if old.min_s <= 0 or min_s < old.min_s:
                old.min_s = min_s
            old.srtt_s, old.p99_s, old.loss, old.ts = srtt_s, p99_s, loss, ts
        self.generation += 1

    def observe_rtt_windows(self, src: int, windows: Iterable[RttWindow], now: float) -> None:
        """:meth:`observe_rtts` for agents' probe windows, in one loop (the ingest hot path).

        The peer is named (a host of the topology), the window's end is clamped to ``now``,
        loss is ``lost / sent``; a window without probes says nothing; a window that lost
        every probe keeps the pair's last RTT and reports full loss (nothing if the pair was
        never measured). Same result as building those rows for :meth:`observe_rtts`."""
        index, pairs = self.topology.host_index, self.pairs
        for w in windows:
            sent = w.sent
            if sent <= 0:
                continue
            lost = w.lost
            dst = index[w.peer]
            ts = t if (t := w.ts) < now else now
            old = pairs.get((src, dst) if src <= dst else (dst, src))
            if sent > lost:
                if old is None:
                    self.set_pair(src, dst, PairState(w.srtt_s, w.min_s, w.p99_s,
                                                      lost / sent, ts))
                elif ts >= old.ts:
                    min_s = w.min_s
                    if old.min_s <= 0 or min_s < old.min_s:
                        old.min_s = min_s
                    old.srtt_s, old.p99_s, old.loss, old.ts = w.srtt_s, w.p99_s, lost / sent, ts
            elif old is not None and ts >= old.ts:  # all lost: the last RTT, full loss
                old.loss, old.ts = 1.0, ts
        self.generation += 1

    def set_pair(self, src: int, dst: int, pair: PairState) -> None:
        """Replace a pair's state as it is (restoring a snapshot; :meth:`observe_rtt` is the
        producers' way in)."""
        key = _pair_key(src, dst)
        self.generation += 1
        self.pairs[key] = pair
        a, b = key
        if a != b:  # a host's RTT to itself says nothing about the network
            self._peers.setdefault(a, {})[b] = pair
            self._peers.setdefault(b, {})[a] = pair

    def observe_host(self, host: int, ts: float) -> None:
        """The host's agent was heard from at ``ts`` (a batch or a heartbeat)."""
        self.generation += 1
        self.host_seen_ts[host] = max(self.host_seen_ts[host], ts)

    def observe_agent(self, agent: str, ts: float) -> None:
        """Agent ``agent`` (a host or a switch agent) was heard from at ``ts``."""
        if ts > self.agents.get(agent, 0.0):
            self.agents[agent] = ts

    # -- derived state --------------------------------------------------------------------
    def link_age(self, now: float | None = None) -> FloatArray:
        now = self.clock() if now is None else now
        age: FloatArray = np.where(self.updated_ts > 0, np.maximum(now - self.updated_ts, 0.0),
                                   np.inf)
        return age

    def link_confidence(self, now: float | None = None,
                        age: FloatArray | None = None) -> FloatArray:
        age = self.link_age(now) if age is None else age
        conf: FloatArray = self.params.freshness(age) * self.source_confidence
        return conf

    def available(self, now: float | None = None,
                  conf: FloatArray | None = None) -> FloatArray:
        """Per-link bandwidth a new transfer can expect, blended with the prior by freshness."""
        conf = self.link_confidence(now) if conf is None else conf
        measured = np.maximum(self.capacity - self.util, self.capacity * self.params.min_share)
        measured = np.where(self.link_up, measured, 0.0)  # a failed link carries nothing
        blended: FloatArray = conf * measured + (1.0 - conf) * self.prior
        return blended

    def link_view(self, now: float | None = None) -> LinkStateOracle:
        """A plain :class:`LinkStateOracle` over the current state (no per-pair RTTs)."""
        age = self.link_age(now)
        conf = self.link_confidence(now, age)
        latency = self.topology.latency + conf * self.queue_s
        return LinkStateOracle(self.topology, self.available(now, conf), latency, age, conf)

    def hosts_alive(self, now: float | None = None) -> np.ndarray[Any, np.dtype[np.bool_]]:
        now = self.clock() if now is None else now
        alive: np.ndarray[Any, np.dtype[np.bool_]] = (
            (self.host_seen_ts > 0) & (now - self.host_seen_ts <= self.params.stale_s))
        return alive

    # -- CostOracle -----------------------------------------------------------------------
    def pair_terms(self, src: int, now: float | None = None
                   ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Per host: the weight of ``src``'s pair RTT (its freshness; 0 if unprobed, stale,
        the host itself or either agent silent), half the smoothed RTT and the capped loss.

        A host whose agent went silent answers no probes: its peers' RTT windows show loss
        that says nothing about the network, so its pairs count as unmeasured.
        """
        now = self.clock() if now is None else now
        n = self.topology.n_hosts
        weight, half_rtt, loss = np.zeros(n), np.zeros(n), np.zeros(n)
        peers = self._peers.get(src)
        if not peers:
            return weight, half_rtt, loss
        silent = (self.host_seen_ts > 0) & (now - self.host_seen_ts > self.params.stale_s)
        if silent[src]:
            return weight, half_rtt, loss
        dst = np.fromiter(peers.keys(), dtype=np.int64, count=len(peers))
        states = list(peers.values())
        ts = np.fromiter((p.ts for p in states), dtype=np.float64, count=len(states))
        w = self.params.freshness(now - ts)
        w[silent[dst]] = 0.0
        weight[dst] = w
        half_rtt[dst] = np.fromiter((p.srtt_s for p in states), dtype=np.float64,
                                    count=len(states)) / 2
        loss[dst] = np.minimum(np.fromiter((p.loss for p in states), dtype=np.float64,
                                           count=len(states)), self.params.max_loss)
        return weight, half_rtt, loss

    def estimate(self, src: int, dsts: IntArray, nbytes: FloatArray | float,
                 now: float | None = None) -> CostEstimate:
        now = self.clock() if now is None else now
        dsts = np.asarray(dsts, dtype=np.int64)
        base = link_state_paths(self.link_view(now), src, dsts)
        weight, half_rtt, loss = (x[dsts] for x in self.pair_terms(src, now))
        return _with_pairs(base, weight, half_rtt, loss, nbytes)

    def cached(self, ttl_s: float, clock: Callable[[], float] | None = None) -> CachedMapView:
        """:meth:`estimate` for a decision hot path: see :class:`CachedMapView`."""
        return CachedMapView(self, ttl_s, self.clock if clock is None else clock)

def _with_pairs(base: CostEstimate, weight: FloatArray, half_rtt: FloatArray,
                loss: FloatArray, nbytes: FloatArray | float) -> CostEstimate:
    """Blend per-pair RTT and loss (see :meth:`CongestionMap.pair_terms`) into a link-path
    estimate: the module docstring's latency and bandwidth formulas."""
    latency = weight * half_rtt + (1 - weight) * base.latency_s
    bandwidth = base.bandwidth_bytes_s * (1.0 - weight * loss)
    seconds = latency + np.asarray(nbytes, dtype=np.float64) / bandwidth
    return CostEstimate(seconds, latency, bandwidth, base.tier, base.age_s, base.confidence)


class CachedMapView:
    """:meth:`CongestionMap.estimate` shaped for a decision hot path.

    The link view (freshness, blended bandwidth) is re-read at most every ``ttl_s`` and
    whenever the map changes; within it each source's row to every host is computed once
    (path-table reductions plus that source's pair corrections), so a decision costs
    O(|D|) numpy. Rows are exact for the time the view was taken.
    """

    def __init__(self, cmap: CongestionMap, ttl_s: float, clock: Callable[[], float]) -> None:
        self.cmap = cmap
        self.topology = cmap.topology
        self.ttl_s = ttl_s
        self.clock = clock
        self._view: LinkStateOracle | None = None
        self._at = -math.inf
        self._generation = -1
        self._rows: dict[int, CostEstimate] = {}

    def _fresh(self) -> tuple[LinkStateOracle, float]:
        now = self.clock()
        if (self._view is None or now - self._at > self.ttl_s
                or self._generation != self.cmap.generation):
            self._view = self.cmap.link_view(now)
            self._at, self._generation = now, self.cmap.generation
            self._rows.clear()
        return self._view, self._at

    @property
    def available_bytes_s(self) -> FloatArray:
        """Per-link bandwidth of the current view (the bookings' link rates)."""
        return self._fresh()[0].available_bytes_s

    def row(self, src: int) -> CostEstimate:
        """Zero-byte estimate from ``src`` to every host."""
        return self.row_and_rate(src)[0]

    def row_and_rate(self, src: int) -> tuple[CostEstimate, FloatArray]:
        """:meth:`row` and :attr:`available_bytes_s`, both of one view (one freshness check:
        a decision reads the two together)."""
        view, at = self._fresh()
        hit = self._rows.get(src)
        if hit is None:
            base = link_state_paths(view, src)
            hit = _with_pairs(base, *self.cmap.pair_terms(src, at), 0.0)
            self._rows[src] = hit
        return hit, view.available_bytes_s

    def estimate(self, src: int, dsts: IntArray, nbytes: FloatArray | float) -> CostEstimate:
        return pick(self.row(src), dsts, nbytes)
