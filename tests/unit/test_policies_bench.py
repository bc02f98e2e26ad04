"""`netkv bench decision` runs, prints its table and writes its JSON (timings not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netkv.cli import main

pytestmark = pytest.mark.unit


def test_decision_bench_writes_table_and_json(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    rc = main(["bench", "decision", "--sizes", "16,64", "--iterations", "20",
               "--policies", "netkv,cache_load,netkv_pair", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "|D|=16" in printed and "netkv_pair" in printed
    data = json.loads(out.read_text())
    for policy in ("netkv", "cache_load", "netkv_pair"):
        for size in ("16", "64"):
            cell = data["results"][policy][size]
            assert 0 < cell["p50_us"] <= cell["p99_us"]
            assert 0 < cell["cpu_p50_us"] <= cell["cpu_p99_us"]
            assert cell["iterations"] == 20
    assert "netkv_p99_at_16" in data["targets"]


def test_decision_bench_rejects_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "decision", "--sizes", "16,9000"]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert main(["bench", "decision", "--policies", "fastest"]) == 2
    assert "unknown policy" in capsys.readouterr().err
