"""The scheduler's hot-path decision series expose what prometheus_client's own Histogram and
Counter would: same names, labels, buckets, counts and sums (the ``_created`` stamps aside)."""

from __future__ import annotations

import random
import re

import pytest
from netkv_scheduler.metrics import DURATION_BUCKETS, TRANSFER_BUCKETS, DecisionSeries
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

pytestmark = pytest.mark.unit

POLICIES = ("netkv", "random", "least_loaded")


def _reference(registry: CollectorRegistry) -> tuple[Histogram, Histogram, Counter]:
    return (Histogram("netkv_decision_duration_seconds", "time to choose a decoder (in-process)",
                      ["policy"], registry=registry, buckets=DURATION_BUCKETS),
            Histogram("netkv_kv_transfer_predicted_seconds",
                      "predicted KV transfer time of choices", ["tier"], registry=registry,
                      buckets=TRANSFER_BUCKETS),
            Counter("netkv_decisions_total", "decisions made", ["policy", "tier", "map"],
                    registry=registry))


def _text(registry: CollectorRegistry) -> str:
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", generate_latest(registry).decode())


def test_decision_series_expose_the_library_text() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    series = DecisionSeries(POLICIES)
    ours.register(series)
    duration, transfer, decisions = _reference(theirs)
    for p in POLICIES:  # the app makes every child up front
        duration.labels(p)
        for t in range(4):
            for m in ("map", "prior"):
                decisions.labels(p, str(t), m)
    for t in range(4):
        transfer.labels(str(t))
    rng = random.Random(5)
    values = [*DURATION_BUCKETS, *TRANSFER_BUCKETS, 0.0, 1e9]  # bounds are inclusive
    for i in range(3000):
        policy, tier, stale = rng.choice(POLICIES), rng.randrange(4), rng.random() < 0.3
        d = values[i] if i < len(values) else rng.expovariate(2000.0)
        x = values[i] if i < len(values) else rng.expovariate(20.0)
        series.record(policy, tier, stale, d, x)
        duration.labels(policy).observe(d)
        transfer.labels(str(tier)).observe(x)
        decisions.labels(policy, str(tier), "prior" if stale else "map").inc()
    assert _text(ours) == _text(theirs)
    assert 'netkv_decisions_total{map="map",policy="netkv",tier="0"}' in _text(ours)
