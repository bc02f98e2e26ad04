"""The embedded workload: its statistics follow the published conversation-trace figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from netkv.errors import InputError
from netkv.workload.synth import PUBLISHED, statistics, synthesise, write_trace
from netkv.workload.trace import load_trace

pytestmark = pytest.mark.unit


def within(value: float, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * target


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_statistics_match_the_published_conversation_trace(seed: int) -> None:
    st = statistics(synthesise(2000, seed))
    assert within(st["mean_input"], PUBLISHED["mean_input"], 0.08), st
    assert within(st["median_input"], PUBLISHED["median_input"], 0.08), st
    assert within(st["p99_input"], PUBLISHED["p99_input"], 0.15), st
    assert st["over_100k"] >= 1 and st["max_input"] <= 128 * 1024, st  # a long tail, bounded
    assert within(st["mean_output"], PUBLISHED["mean_output"], 0.05), st
    assert within(st["median_output"], PUBLISHED["median_output"], 0.08), st
    assert within(st["rate_per_s"], PUBLISHED["rate_per_s"], 0.10), st
    assert st["min_gap_ms"] == 3000.0, st  # arrivals in 3-second buckets
    assert st["first_block_0"] == 1.0, st  # the shared system-prompt block
    assert abs(st["reuse"] - PUBLISHED["reuse"]) <= 0.03, st
    assert abs(st["follow_up"] - PUBLISHED["follow_up"]) <= 0.04, st


def test_seeded_reproducible_and_written_in_the_strict_format(tmp_path: Path) -> None:
    a, b, c = synthesise(300, 7), synthesise(300, 7), synthesise(300, 8)
    assert a.hash_ids == b.hash_ids and np.array_equal(a.input_tokens, b.input_tokens)
    assert a.hash_ids != c.hash_ids
    path = tmp_path / "t.jsonl"
    write_trace(a, path)
    back = load_trace(path)  # the strict parser accepts every line
    assert back.hash_ids == a.hash_ids
    assert np.array_equal(back.output_tokens, a.output_tokens)
    assert np.allclose(back.arrival_s, a.arrival_s)


def test_follow_ups_extend_an_earlier_prompt() -> None:
    trace = synthesise(500, 0)
    seen: set[tuple[int, ...]] = set()
    extended = 0
    for ids in trace.hash_ids:
        if any(ids[:k] in seen for k in range(2, len(ids))):
            extended += 1
        seen.update(ids[:k] for k in range(2, len(ids) + 1))
    assert extended >= 0.3 * len(trace)


def test_bad_size_is_an_input_error() -> None:
    with pytest.raises(InputError, match="requests"):
        synthesise(0)
