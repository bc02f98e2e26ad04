"""The telemetry benchmark's ingest measurement drains what it wrote, all accepted, and
reports it per round and as mean and 95% CI (table and JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from netkv.bench.telemetry import configure, measure_ingest, measure_ingest_rounds, run
from netkv.core.topology_file import parse_topology
from netkv.localservers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_ingest_measurement_counts_every_sample(redis_server: RedisServer) -> None:
    topology = parse_topology({"fat_tree": {}})  # 8 hosts: batches of 1 NIC + 7 RTT samples
    result = await measure_ingest(topology, redis_server.url, 4000)
    assert result["samples"] == 4000 and result["rejected"] == 0
    assert result["ingest_samples_per_s"] > 0 and result["ingest_samples_per_cpu_s"] > 0


async def test_ingest_rounds_report_mean_ci_and_every_round(redis_server: RedisServer) -> None:
    topology = parse_topology({"fat_tree": {}})
    result = await measure_ingest_rounds(topology, redis_server.url, 2000, rounds=2)
    assert [r["samples"] for r in result["rounds"]] == [2000, 2000]
    assert result["samples_per_batch"] == 8 and len(result["load_average_1m"]) == 2
    per_cpu = [r["ingest_samples_per_cpu_s"] for r in result["rounds"]]
    assert result["ingest_samples_per_cpu_s"] == pytest.approx(sum(per_cpu) / 2)
    assert 0 <= result["ingest_samples_per_cpu_s_ci95"] < float("inf")


def test_ingest_only_run_prints_the_table_and_writes_json(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    out = tmp_path / "bench.json"
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--agents", "8", "9", "--ingest-only", "--rounds", "2",
                              "--ingest-samples", "1000", "--out", str(out)])
    assert run(args) == 0
    rows = json.loads(out.read_text())
    assert [r["agents"] for r in rows] == [8, 9]
    for r in rows:
        assert r["ingest_samples_per_s"] > 0 and r["ingest_samples_per_cpu_s"] > 0
        assert len(r["detail"]["ingest"]["rounds"]) == 2
        assert "freshness_p50_s" not in r  # --ingest-only: no live mesh
    table = capsys.readouterr().out
    assert "per CPU-s" in table and "fresh p50" not in table
