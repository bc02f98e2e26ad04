"""The proxy's loop histograms expose what prometheus_client's Histogram exposes; its stall
monitor sees a blocked event loop and the collector's passes."""

from __future__ import annotations

import asyncio
import gc
import time

import numpy as np
import pytest
from netkv_proxy.metrics import LATENCY_BUCKETS, LoopHistogram, ProxyMetrics
from netkv_proxy.stalls import StallMonitor
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


async def test_the_stall_monitor_sees_a_blocked_loop_and_gc_passes() -> None:
    metrics = ProxyMetrics()
    with StallMonitor(metrics, interval_s=0.005) as monitor:
        task = asyncio.ensure_future(monitor.run())
        try:
            await asyncio.sleep(0.05)
            time.sleep(0.03)  # noqa: ASYNC251 - the point: a 30 ms stall of the loop
            await asyncio.sleep(0.02)
            gc.collect(0)
            gc.collect(2)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    text = generate_latest(metrics.registry).decode()
    lag = metrics.loop_lag
    assert lag.count >= 5
    assert sum(lag.counts[lag.bounds.index(0.02) + 1:]) >= 1  # the stall, late by > 20 ms
    assert 'netkv_proxy_gc_pause_seconds_count{generation="0"}' in text
    assert metrics.gc_pause.labels("2")._sum.get() > 0
    assert monitor._on_gc not in gc.callbacks  # left with the block
