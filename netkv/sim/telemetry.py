"""What policies see of the network in the simulator.

* :class:`TelemetryView` is the sampled, delayed, noisy view: what link counters show as not
  free (lost capacity, background, and with ``own_flows`` the scheduler's own KV flows) is
  sampled every ``interval_s`` and becomes visible ``delay_s`` later, each sample with
  multiplicative log-normal error ``noise`` per link plus an additive error of
  ``idle_noise`` of the capacity (so idle links are not seen as exactly idle); residual
  bandwidth is ``max(capacity - measured, floor * capacity)``. With ``ground_truth`` it is
  the exact instantaneous share a new flow could get (the physical limit a perfect map could
  give).

  Without ``own_flows`` both exclude the scheduler's own KV transfers, which the policy counts
  through its bookings; with it (what a deployed map shows) the sample counts them again until
  they end. Both are :class:`~netkv.core.costmodel.LinkStateOracle`\\ s whose per-link arrays are
  refreshed in place.
* :class:`NicRateView` and :class:`NicByteView` are what the policies see of the NICs their
  instances are bound to: each NIC's rate and state, and how the instance's transfers really
  split over those NICs (from the per-NIC byte counters), both on the same schedule.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Any

import numpy as np

from netkv.core.costmodel import LinkStateOracle
from netkv.core.topology import FloatArray, IntArray, Topology
from netkv.sim.fabric import DEAD, INF, MAX_BACKGROUND, Fabric
from netkv.sim.scenario import TelemetrySection

NOISE_CACHE_BYTES = 64 * 2**20
_NOISE: OrderedDict[tuple[int, int, int, float, float],
                    tuple[FloatArray | None, FloatArray | None]] = OrderedDict()
_noise_bytes = [0]


def sample_noise(seed: int, k: int, n: int, noise: float,
                 idle_noise: float) -> tuple[FloatArray | None, FloatArray | None]:
    """Sample ``k``'s measurement errors: the log-normal factor per link (``noise`` > 0) and
    the absolute standard normal of the idle error (``idle_noise`` > 0), drawn in that order
    from the generator seeded ``(seed, k)``.

    They depend on nothing else, and every policy of a matrix runs with the same seeds, so
    they are kept (up to ``NOISE_CACHE_BYTES`` per process) instead of re-seeding a generator
    per sample per run; the arrays are never written to."""
    key = (seed, k, n, noise, idle_noise)
    hit = _NOISE.get(key)
    if hit is not None:
        _NOISE.move_to_end(key)
        return hit
    rng = np.random.default_rng((seed, k))
    factor = rng.lognormal(0.0, noise, n) if noise > 0 else None
    idle = np.abs(rng.standard_normal(n)) if idle_noise > 0 else None
    for arr in (factor, idle):
        if arr is not None:
            arr.flags.writeable = False
            _noise_bytes[0] += arr.nbytes
    _NOISE[key] = (factor, idle)
    while _noise_bytes[0] > NOISE_CACHE_BYTES and _NOISE:
        for arr in _NOISE.popitem(last=False)[1]:
            if arr is not None:
                _noise_bytes[0] -= arr.nbytes
    return factor, idle


class BackgroundHistory:
    """Piecewise-constant measured load per link, recorded as it is sampled."""

    def __init__(self, n_links: int) -> None:
        self.times: list[float] = [0.0]
        self.values: list[FloatArray] = [np.zeros(n_links, dtype=np.float64)]

    def record(self, t: float, background: FloatArray) -> None:
        if t == self.times[-1]:
            self.values[-1] = background.copy()
        else:
            self.times.append(t)
            self.values.append(background.copy())

    def at(self, t: float) -> FloatArray:
        return self.values[max(bisect.bisect_right(self.times, t) - 1, 0)]


class TelemetryView:
    """A cost oracle fed by (possibly stale and noisy) link measurements."""

    def __init__(self, topology: Topology, history: BackgroundHistory,
                 spec: TelemetrySection, seed: int, *, ground_truth: bool = False) -> None:
        self.capacity = topology.capacity
        self.history = history
        self.spec = spec
        self.seed = seed
        self.ground_truth = ground_truth
        n = topology.n_links
        self.oracle = LinkStateOracle(topology, topology.capacity.copy(),
                                      topology.latency.copy(), np.zeros(n),
                                      np.ones(n) if ground_truth else np.full(n, 0.8))
        self._sample = -1
        self._floor = self.capacity * max(spec.floor, 1.0 - MAX_BACKGROUND)

    def refresh(self, now: float, unavailable_now: FloatArray | None) -> LinkStateOracle:
        """Bring the oracle's arrays to what is visible at ``now`` (``unavailable_now``: the
        exact state, needed only by the ground truth)."""
        if self.ground_truth:
            if unavailable_now is not None:
                np.maximum(self.capacity - unavailable_now, self._floor,
                           out=self.oracle.available_bytes_s)
            return self.oracle
        k = max(int((now - self.spec.delay_s) // self.spec.interval_s), 0)
        if k != self._sample:
            self._sample = k
            sample_t = k * self.spec.interval_s
            measured = self.history.at(sample_t)
            if self.spec.noise > 0 or self.spec.idle_noise > 0:
                factor, idle = sample_noise(self.seed, k, measured.shape[0], self.spec.noise,
                                            self.spec.idle_noise)
                if factor is not None:
                    measured = measured * factor
                if idle is not None:
                    measured = measured + self.capacity * self.spec.idle_noise * idle
            np.maximum(self.capacity - measured, self._floor, out=self.oracle.available_bytes_s)
            self.oracle.age_s[:] = max(now - sample_t, 0.0)
        return self.oracle


def bound_nic_rates(topology: Topology, fabric: Fabric, nic_first: IntArray,
                    nic_width: IntArray) -> FloatArray:
    """Per instance, the most a transfer striped over the NICs it is bound to can get: one
    stripe per bound NIC, so their number times the slowest one's rate (a striped transfer
    waits for its slowest stripe), the lower of the send and receive directions. A NIC that
    is down does not count (its stripe moves to another NIC of the host, as the fabric
    re-stripes it).

    It reads only each NIC's current rate (what a faulted NIC negotiated, 0 for one that is
    down): per NIC, what the agent publishes (``NicSample.capacity_bps`` from sysfs
    ``speed`` and ``oper_up``); the binding is the operator's (``UCX_NET_DEVICES``)."""
    out = np.empty(topology.instance_host.shape[0], dtype=np.float64)
    for i, h in enumerate(topology.instance_host):
        width = int(nic_width[i])
        rate = INF
        for link in (topology.up_chain[h, 0], topology.down_chain[h, 0]):
            ids = fabric.members[int(link)]
            bound = ids[(int(nic_first[i]) + np.arange(width)) % ids.shape[0]]
            cap = fabric.capacity[bound]
            alive = cap >= DEAD * fabric.nominal[bound]
            if np.any(alive):
                rate = min(rate, float(width) * float(cap[alive].min()))
            else:  # every bound NIC down: re-striped over the host's others
                rate = min(rate, float(width) * float(fabric.nominal[bound].min()))
        out[i] = rate
    return out


class NicRateView:
    """The bound-NIC rates (:func:`bound_nic_rates`) a policy sees: recorded whenever a
    fault changes a capacity, and visible on the telemetry's sampling schedule (sampled
    every ``interval_s``, seen ``delay_s`` later; the agent re-reads a NIC's rate at most
    every second, ``CAPACITY_CACHE_S``). ``mode``: ``telemetry`` (that schedule), ``truth``
    (the current rates) or ``static`` (the nominal rates, always: a static table sees no
    fault)."""

    def __init__(self, nominal: FloatArray, spec: TelemetrySection, mode: str) -> None:
        self.nominal = nominal
        self.spec = spec
        self.mode = mode
        self.times: list[float] = [0.0]
        self.values: list[FloatArray] = [nominal]
        self.changed = False  # nothing but the nominal rates recorded yet

    def record(self, now: float, rates: FloatArray) -> None:
        if self.mode == "static":
            return
        self.changed = True
        if now == self.times[-1]:
            self.values[-1] = rates
        else:
            self.times.append(now)
            self.values.append(rates)

    def at(self, now: float) -> FloatArray:
        if not self.changed:
            return self.nominal
        if self.mode == "truth":
            return self.values[-1]
        k = max(int((now - self.spec.delay_s) // self.spec.interval_s), 0)
        sample_t = k * self.spec.interval_s
        return self.values[max(bisect.bisect_right(self.times, sample_t) - 1, 0)]


# What the per-NIC byte counters must show before the striping estimate is trusted, and how
# it is read (the choices are stated in NicByteView's docstring).
STRIPE_WINDOW_S = 5.0
STRIPE_SHORT = 0.5


class NicByteView:
    """How each instance's transfers really split over the NICs it is bound to, from per-NIC
    byte counters: a factor per instance (effective stripes / bound stripes, in ``(0, 1]``)
    that the policies' bound-NIC rates are multiplied by.

    **Source.** The agents publish each NIC's byte counters as rates over their counter
    window (``NicSample.tx_bytes_s``/``rx_bytes_s``, netlink ``rtnl_link_stats64``, read every
    ``counter_interval_s`` = 0.5 s, agents/netkv_agent/settings.py); the simulator's samples
    are the fabric's exact per-NIC bytes (:attr:`~netkv.sim.fabric.Fabric.nic_bytes`: every
    flow, KV or not), taken every ``interval_s`` and seen ``delay_s`` later (the scenario's
    telemetry section, which takes both from the agent's interval and the measured mesh
    freshness). Byte counters are exact counts, so no noise is added to them. The scheduler
    knows what it sent itself: the bytes of each off-host transfer, per instance, and when
    they flowed (from the transfer's start to its landing, as the transfer engine reports
    each transfer's completion), learnt when it lands (:meth:`landed`); a window counts the
    transfers that flowed entirely within it (:meth:`own_bytes`).

    **Estimate.** Over the last ``window_s`` of samples, an instance that sent (prefill: its
    NICs' transmit counters) or received (decode: receive counters) ``K`` bytes of its own
    transfers should have put at least ``K / width`` on each of its ``width`` bound NICs
    (other traffic only adds). A bound NIC that is up and carried less than ``short`` of that
    share did not carry its stripes; with ``s`` such NICs the instance's transfers run on
    ``max(width - s, 1)`` stripes. A NIC that is down is not counted short (its stripe moved
    to another NIC, as :func:`bound_nic_rates` already assumes). A window with less than
    ``min_bytes`` of the instance's own traffic says nothing about it: the instance keeps the
    estimate of its latest window that had enough (a NIC binding is configuration and
    persists), and the nominal striping (factor 1) until it has had one.

    Choices (stated): ``window_s`` = 5 s (ten agent windows: long against a transfer,
    milliseconds here, so the transfers that straddle the window's edges are a small part of
    it); keeping the last trusted estimate rather than falling back to 1 after a quiet
    window (found on the tuning slices: a prefill host sends a transfer every few seconds,
    so a 5 s window without traffic is common, and falling back there hid the skew from the
    skewed host's prefill for 88-91% of the slices' time); the risk is a decoder whose
    estimate is wrong and that then gets no traffic to correct it (none was flagged there);
    ``short`` = 0.5, the midpoint between what a bound NIC carries when the stripes skip it
    (nothing of its share) and when they use it (all of it, or more with other traffic);
    ``min_bytes``: one prefix block of KV (the smallest transfer the scheduler makes).

    ``mode``: ``telemetry`` (the above), ``truth`` (the exact striping: one stripe on a host
    whose transfers all take its first NIC) or ``static`` (always 1: a static table sees no
    fault).
    """

    def __init__(self, topology: Topology, fabric: Fabric, nic_first: IntArray,
                 nic_width: IntArray, spec: TelemetrySection, *, mode: str, min_bytes: float,
                 window_s: float = STRIPE_WINDOW_S, short: float = STRIPE_SHORT) -> None:
        self.spec = spec
        self.mode = mode
        self.fabric = fabric
        self.min_bytes = min_bytes
        self.short = short
        self.lag = max(round(window_s / spec.interval_s), 1)
        n = topology.instance_host.shape[0]
        self.width = np.maximum(nic_width, 1).astype(np.float64)
        self.ones: FloatArray = np.ones(n, dtype=np.float64)
        self.host = topology.instance_host
        # Per instance and direction (0: transmit, 1: receive), its bound NIC members, and
        # which directions its role uses (prefill sends, decode receives).
        self.bound: list[tuple[IntArray, IntArray]] = []
        self.uses: list[tuple[bool, bool]] = []
        for i, h in enumerate(topology.instance_host):
            sides = []
            for link in (topology.up_chain[h, 0], topology.down_chain[h, 0]):
                ids = fabric.members[int(link)]
                sides.append(ids[(int(nic_first[i]) + np.arange(int(self.width[i])))
                                 % ids.shape[0]])
            self.bound.append((sides[0], sides[1]))
            role = topology.instances[i].role
            self.uses.append((role != "decode", role != "prefill"))
        self._landed: list[tuple[float, float, int, int, float]] = []
        self._snaps: list[FloatArray] = []
        self.times: list[float] = [0.0]
        self.values: list[FloatArray] = [self.ones]
        self._truth: tuple[frozenset[int], FloatArray] = (frozenset(), self.ones)

    def landed(self, src: int, dst: int, nbytes: float, start: float, end: float) -> None:
        """An off-host transfer of ``nbytes`` from instance ``src`` to ``dst``, whose bytes
        flowed from ``start`` to ``end``, has landed."""
        self._landed.append((start, end, src, dst, nbytes))

    def own_bytes(self, lo: float, hi: float) -> tuple[FloatArray, FloatArray]:
        """Per instance, the bytes of its landed transfers that flowed entirely within
        ``[lo, hi]``, sent and received: all of their bytes are in the window's counters, on
        whichever NICs carried them. A transfer that straddles an edge is left out (its
        stripes need not progress together: one on a congested spine ends last, so no even
        split of its bytes over time is right); its bytes in the window only add to the
        counters. Transfers that ended before ``lo`` are forgotten."""
        sent = np.zeros(self.ones.shape[0])
        received = np.zeros(self.ones.shape[0])
        keep = []
        for t in self._landed:
            start, end, src, dst, nbytes = t
            if end < lo:
                continue
            keep.append(t)
            if start >= lo and end <= hi:
                sent[src] += nbytes
                received[dst] += nbytes
        self._landed = keep
        return sent, received

    def sample(self, now: float) -> None:
        """A counter sample at ``now`` (the fabric's counters read as at ``now``): the
        window's estimate, visible ``delay_s`` later."""
        if self.mode != "telemetry":
            return
        self._snaps.append(self.fabric.nic_bytes_at(now))
        if len(self._snaps) <= self.lag:
            return
        old = self._snaps.pop(0)
        sent, received = self.own_bytes(now - self.lag * self.spec.interval_s, now)
        factors = self.estimate(self._snaps[-1] - old, sent, received,
                                self.fabric.capacity >= DEAD * self.fabric.nominal)
        last = self.values[-1]
        if not np.array_equal(factors, last):
            self.times.append(now + self.spec.delay_s)
            self.values.append(factors if np.any(factors != 1.0) else self.ones)

    def estimate(self, nic_bytes: FloatArray, sent: FloatArray, received: FloatArray,
                 alive: Any) -> FloatArray:
        """The factors from one window's per-NIC bytes and own bytes per instance."""
        out = self.values[-1].copy()
        for i, (tx, rx) in enumerate(self.bound):
            width = self.width[i]
            factor = 1.0
            trusted = False
            for ids, own, used in ((tx, sent[i], self.uses[i][0]),
                                   (rx, received[i], self.uses[i][1])):
                if not used or own < self.min_bytes:
                    continue
                trusted = True
                share = own / width
                short = int(np.count_nonzero((nic_bytes[ids] < self.short * share)
                                             & alive[ids]))
                factor = min(factor, max(width - short, 1.0) / width)
            if trusted:
                out[i] = factor
        return out

    def truth(self) -> FloatArray:
        """The exact factors: one stripe for the instances of a skewed host (kept while the
        set of skewed hosts is the same)."""
        skewed = frozenset(self.fabric.skewed)
        if skewed != self._truth[0]:
            factors = np.where(np.isin(self.host, list(skewed)), 1.0 / self.width, 1.0)
            self._truth = (skewed, factors if skewed else self.ones)
        return self._truth[1]

    def at(self, now: float) -> FloatArray:
        if self.mode == "static":
            return self.ones
        if self.mode == "truth":
            return self.truth()
        if len(self.times) == 1:
            return self.ones
        return self.values[max(bisect.bisect_right(self.times, now) - 1, 0)]
