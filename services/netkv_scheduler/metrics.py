"""The per-decision series, recorded on the hot path with plain arithmetic.

``prometheus_client``'s ``Histogram.observe`` and ``Counter.inc`` take a lock and walk the
buckets in Python on every call (about a tenth of a decision's server time at |D| = 64); a
decision is made on the event loop thread only, so :class:`DecisionSeries` keeps plain counts
and builds the same families at scrape time: ``netkv_decision_duration_seconds{policy}``,
``netkv_kv_transfer_predicted_seconds{tier}`` and ``netkv_decisions_total{policy,tier,map}``
(with their ``_created`` series), the same names, labels, buckets and text as the library's.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

DURATION_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2)
TRANSFER_BUCKETS = (1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TIERS = range(4)
MAPS = ("map", "prior")


class _Histogram:
    """One label set's buckets (``counts[i]``: observations in ``(bound[i-1], bound[i]]``,
    the last one past every bound) and sum."""

    __slots__ = ("bounds", "counts", "labels", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.labels = [floatToGoString(b)  # type: ignore[no-untyped-call]
                       for b in (*self.bounds, float("inf"))]
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for label, count in zip(self.labels, self.counts, strict=True):
            total += count
            out.append((label, float(total)))
        return out


class DecisionSeries(Collector):
    """What every decision records: :meth:`record` is a few additions, no lock, no lookup of
    labels by name (every label set exists from the start, as with pre-made children)."""

    def __init__(self, policies: Sequence[str]) -> None:
        self.created = time.time()
        self.duration = {p: _Histogram(DURATION_BUCKETS) for p in policies}
        self.transfer = {t: _Histogram(TRANSFER_BUCKETS) for t in TIERS}
        self.decisions = {(p, t, m): 0 for p in policies for t in TIERS for m in MAPS}

    def record(self, policy: str, tier: int, stale: bool, duration_s: float,
               transfer_s: float) -> None:
        # one observation per histogram (bisect_left: le is inclusive, as the library's)
        hist = self.duration[policy]
        hist.counts[bisect_left(hist.bounds, duration_s)] += 1
        hist.sum += duration_s
        hist = self.transfer[tier]
        hist.counts[bisect_left(hist.bounds, transfer_s)] += 1
        hist.sum += transfer_s
        self.decisions[policy, tier, MAPS[stale]] += 1

    def collect(self) -> Iterable[Metric]:
        yield from self._histogram("netkv_decision_duration_seconds",
                                   "time to choose a decoder (in-process)", "policy",
                                   self.duration)
        yield from self._histogram("netkv_kv_transfer_predicted_seconds",
                                   "predicted KV transfer time of choices", "tier",
                                   {str(t): h for t, h in self.transfer.items()})
        counts = CounterMetricFamily("netkv_decisions", "decisions made",
                                     labels=["policy", "tier", "map"])
        for (policy, tier, source), n in self.decisions.items():
            counts.add_metric([policy, str(tier), source], float(n), created=self.created)
        yield counts

    def _histogram(self, name: str, doc: str, label: str,
                   series: dict[str, _Histogram]) -> Iterable[Metric]:
        family = HistogramMetricFamily(name, doc, labels=[label])
        for value, hist in series.items():
            family.add_metric([value], hist.cumulative(), hist.sum)
            family.samples.append(Sample(f"{name}_created", {label: value}, self.created))
        yield family
