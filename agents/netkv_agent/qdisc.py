"""tc qdisc state of the agent's NICs over netlink: backlog now, drops as a rate.

A standing backlog at the root qdisc means the NIC is the bottleneck right now (the rate
counters say how busy it is; the backlog says packets are waiting). We read the root qdisc
(parent ``TC_H_ROOT``) of each interface from one ``RTM_GETQDISC`` dump, preferring
``TCA_STATS2``/``TCA_STATS_QUEUE`` and falling back to legacy ``TCA_STATS``. Classful roots
such as ``mq`` or ``htb`` report the sum of their children in the kernel's dump.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from netkv.telemetry.samples import QdiscSample
from netkv_agent.counters import RateTracker

TC_H_ROOT = 0xFFFFFFFF


def _queue_stats(msg: Any) -> tuple[int, int, int] | None:
    """(backlog bytes, backlog packets, drops) of a qdisc message."""
    queue = msg.get(("stats2", "TCA_STATS_QUEUE"))
    if queue is not None:
        return int(queue["backlog"]), int(queue["qlen"]), int(queue["drops"])
    legacy = msg.get("stats")
    if legacy is not None:
        return int(legacy["backlog"]), int(legacy["qlen"]), int(legacy["drop"])
    return None


@dataclass(slots=True)
class QdiscReader:
    reporter: str
    interfaces: Sequence[str]
    _trackers: dict[tuple[int, int], RateTracker] = field(default_factory=dict)

    async def read(self, ipr: Any, index: Mapping[str, int],
                   wall: float | None = None) -> list[QdiscSample]:
        """``index`` maps each interface to its ifindex (resolved by the NIC reader)."""
        messages: list[Any] = []
        for name in self.interfaces:
            if name in index:
                try:
                    messages += [m async for m in await ipr.get_qdiscs(index=index[name])]
                except NetlinkError:
                    continue  # the interface vanished between the two reads
        index_of = {i: n for n, i in index.items()}
        return self.ingest(messages, index_of, time.monotonic(),
                           time.time() if wall is None else wall)

    def ingest(self, messages: Sequence[Any], index_of: dict[int, str], now: float,
               wall: float) -> list[QdiscSample]:
        wanted = set(self.interfaces)
        samples: list[QdiscSample] = []
        for msg in messages:
            if msg["parent"] != TC_H_ROOT:
                continue
            name = index_of.get(int(msg["index"]))
            if name is None or name not in wanted:
                continue
            stats = _queue_stats(msg)
            if stats is None:
                continue
            backlog, qlen, drops = stats
            # A new root qdisc (new handle) restarts its counters: new baseline.
            key = (int(msg["index"]), int(msg["handle"]))
            tracker = self._trackers.setdefault(key, RateTracker(bits={"drops": 32}))
            result = tracker.update({"drops": drops}, now)
            if result is None:
                continue
            rates, window = result
            samples.append(QdiscSample(
                reporter=self.reporter, nic=name, ts=wall, window_s=window,
                backlog_bytes=float(backlog), backlog_packets=float(qlen),
                drops_s=rates["drops"]))
        return samples
