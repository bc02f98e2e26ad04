"""The proxy's loop histograms expose what prometheus_client's Histogram exposes."""

from __future__ import annotations

import numpy as np
import pytest
from netkv_proxy.metrics import LATENCY_BUCKETS, LoopHistogram
from prometheus_client import CollectorRegistry, Histogram, generate_latest

pytestmark = pytest.mark.unit


def test_the_same_exposition_as_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("x_seconds", "doc", buckets=LATENCY_BUCKETS, registry=ours)
    ref = Histogram("x_seconds", "doc", buckets=LATENCY_BUCKETS, registry=theirs)
    rng = np.random.default_rng(3)
    values = [*LATENCY_BUCKETS, 0.0, 1e9, *(float(v) for v in rng.exponential(0.05, 500))]
    for v in values:  # the bounds themselves too: a value on a bound is in that bucket
        loop.observe(v)
        ref.observe(v)
    want = [line for line in generate_latest(theirs).decode().splitlines()
            if "_created" not in line]
    assert generate_latest(ours).decode().splitlines() == want
    assert loop.count == len(values)
