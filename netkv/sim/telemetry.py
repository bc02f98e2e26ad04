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
"""

from __future__ import annotations

import bisect
from collections import OrderedDict

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
