"""The TTFT breakdown of a router comparison (netkv.testbed.breakdown)."""

from __future__ import annotations

from pathlib import Path

import pytest

from netkv.engine.model import EngineModel
from netkv.testbed.breakdown import breakdown, main


def test_two_prompts_on_one_prefill_queue_and_a_shared_prefix_is_skipped() -> None:
    model = EngineModel()
    trace = [{"input_length": 1024, "hash_ids": [1, 2]},
             {"input_length": 1536, "hash_ids": [1, 2, 3]}]
    rows = [{"router": "x", "request_id": f"r{i}", "prefill": "p0", "error": None,
             "arrival_s": 0.0, "ttft_s": 1.0, "kv_bytes": 10,
             "transfer_start_s": 0.5 + i, "transfer_end_s": 0.6 + i, "first_token_s": 0.7 + i}
            for i in range(2)]
    got = breakdown(trace, rows, model)["x"]
    first, second = model.prefill_s(1024), model.prefill_s(512)  # 2 blocks cached
    assert got["compute"] == pytest.approx(1e3 * (first + second) / 2)
    assert got["queue"] == pytest.approx(1e3 * first / 2)  # the second waits for the first
    assert got["kv"] == pytest.approx(100.0) and got["after"] == pytest.approx(100.0)
    assert got["hand"] == pytest.approx(1e3 * ((0.5 - first) + (1.5 - first - second)) / 2)
    assert got["n"] == 2


def test_a_path_that_is_not_a_comparison_output_is_refused_by_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stray = tmp_path / "run.log"
    stray.write_text("not a directory")
    assert main(["--table", str(stray)]) == 2
    assert f"{stray}: not a comparison's output directory (no routers.json)" in \
        capsys.readouterr().err
    assert main(["trace.jsonl", str(tmp_path)]) == 2
    assert "no router-requests.jsonl" in capsys.readouterr().err
