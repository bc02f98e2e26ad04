"""tc qdisc state of the agent's NICs over netlink: backlog now, drops as a rate.

A standing backlog at the root qdisc means the NIC is the bottleneck right now (the rate
counters say how busy it is; the backlog says packets are waiting). We ask the kernel for
each interface's root qdisc (``RTM_GETQDISC`` *get* for parent ``TC_H_ROOT``, see
:mod:`netkv_agent.rtnetlink`), preferring ``TCA_STATS2``/``TCA_STATS_QUEUE`` and falling back
to legacy ``TCA_STATS``. Classful roots such as ``mq`` or ``htb`` report the sum of their
children.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from netkv.contracts.samples import QdiscSample
from netkv_agent.counters import RateTracker
from netkv_agent.rtnetlink import RouteSocket

# (interface, ifindex, root handle, backlog bytes, backlog packets, drops)
QdiscReading = tuple[str, int, int, int, int, int]


@dataclass(slots=True)
class QdiscReader:
    reporter: str
    interfaces: Sequence[str]
    _trackers: dict[tuple[int, int], RateTracker] = field(default_factory=dict)

    def read(self, route: RouteSocket, index: Mapping[str, int],
             wall: float | None = None) -> list[QdiscSample]:
        """``index`` maps each interface to its ifindex (resolved by the NIC reader)."""
        readings: list[QdiscReading] = []
        for name in self.interfaces:
            if name in index:
                root = route.root_qdisc(index[name])  # None: gone, or a built-in root
                if root is not None:
                    readings.append((name, index[name], *root))
        return self.ingest(readings, time.monotonic(), time.time() if wall is None else wall)

    def ingest(self, readings: Sequence[QdiscReading], now: float,
               wall: float) -> list[QdiscSample]:
        wanted = set(self.interfaces)
        samples: list[QdiscSample] = []
        for name, ifindex, handle, backlog, qlen, drops in readings:
            if name not in wanted:
                continue
            # A new root qdisc (new handle) restarts its counters: new baseline.
            tracker = self._trackers.setdefault((ifindex, handle),
                                                RateTracker(bits={"drops": 32}))
            result = tracker.update({"drops": drops}, now)
            if result is None:
                continue
            rates, window = result
            samples.append(QdiscSample(
                reporter=self.reporter, nic=name, ts=wall, window_s=window,
                backlog_bytes=float(backlog), backlog_packets=float(qlen),
                drops_s=rates["drops"]))
        return samples
