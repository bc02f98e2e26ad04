"""The telemetry benchmark's ingest measurement drains what it wrote, all accepted."""

from __future__ import annotations

import pytest

from netkv.bench.telemetry import measure_ingest
from netkv.core.topology_file import parse_topology
from netkv.localservers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_ingest_measurement_counts_every_sample(redis_server: RedisServer) -> None:
    topology = parse_topology({"fat_tree": {}})  # 8 hosts: batches of 1 NIC + 7 RTT samples
    result = await measure_ingest(topology, redis_server.url, 4000)
    assert result["samples"] == 4000 and result["rejected"] == 0
    assert result["ingest_samples_per_s"] > 0 and result["ingest_samples_per_cpu_s"] > 0
