"""Replay bookkeeping (pure): trace slices are validated and rebased, summaries have the
simulator's shape, and failed requests are counted, not averaged in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netkv.errors import InputError
from netkv.testbed.engines import Outcome
from netkv.testbed.runner import (
    PolicyResult,
    ReplaySpec,
    format_table,
    load_requests,
    write_summary,
)
from netkv.testbed.workload import synthetic_requests

pytestmark = pytest.mark.unit


def _trace(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_slice_is_rebased_compressed_and_clamped(tmp_path: Path) -> None:
    rows = [{"timestamp": 10_000 + 1000 * i, "input_length": 512 * (i + 1),
             "output_length": 10, "hash_ids": list(range(i + 1))} for i in range(10)]
    reqs = load_requests(_trace(tmp_path, rows), ReplaySpec(start=2, count=5, speedup=2.0,
                                                           max_span_s=1.5))
    assert [r.request_id for r in reqs] == ["r2", "r3", "r4", "r5", "r6"]
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 1.0, 1.5, 1.5]
    assert reqs[0].block_hashes == (0, 1, 2)


@pytest.mark.parametrize(("row", "match"), [
    ({"timestamp": 0, "output_length": 1, "hash_ids": []}, "missing required field"),
    ({"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}, "must be >= 1"),
])
def test_bad_trace_records_name_the_line(tmp_path: Path, row: dict[str, object],
                                         match: str) -> None:
    # read by the simulator's strict reader: the line and the field are named
    with pytest.raises(InputError, match=match) as info:
        load_requests(_trace(tmp_path, [row]), ReplaySpec())
    assert info.value.where.endswith(":1: input_length")


def test_summary_counts_errors_and_has_the_simulator_shape(tmp_path: Path) -> None:
    ok = [Outcome(f"r{i}", "h000-p0", decode="h001-d1", arrival_s=0.0,
                  transfer_start_s=1.0, transfer_end_s=1.0 + 0.1 * (i + 1),
                  first_token_s=2.0 + i) for i in range(4)]
    bad = Outcome("r9", "h000-p0", error="TimeoutError")
    result = PolicyResult("netkv", [*ok, bad])
    s = result.summary()
    assert (s["requests"], s["completed"], s["errors"]) == (5, 4, 1)
    assert s["ttft_mean_s"] == pytest.approx(3.5)
    assert s["transfer_mean_s"] == pytest.approx(0.25)
    path = write_summary(tmp_path / "out", {"netkv": result}, {"scale": 1e-4})
    data = json.loads(path.read_text())
    assert set(data["policies"]["netkv"]) >= {"ttft_mean_s", "ttft_p99_s", "transfer_mean_s"}
    assert len((tmp_path / "out" / "requests.jsonl").read_text().splitlines()) == 5
    assert "netkv" in format_table({"netkv": result})


def test_synthetic_slice_is_deterministic() -> None:
    spec = ReplaySpec(count=20)
    a, b = synthetic_requests(spec), synthetic_requests(spec)
    assert a == b and len(a) == 20
    assert all(len(r.block_hashes) == (r.prompt_tokens + 511) // 512 for r in a)
