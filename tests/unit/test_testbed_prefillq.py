"""The prefill queues of a router comparison (netkv.testbed.prefillq), by hand."""

from __future__ import annotations

import pytest

from netkv.engine.model import EngineModel
from netkv.testbed.prefillq import counterfactual, queues, replay


def row(router: str, rid: str, prefill: str, received: float, start: float, *,
        tokens: int = 1_000) -> dict[str, object]:
    return {"router": router, "request_id": rid, "prefill": prefill, "error": None,
            "prompt_tokens": tokens,
            "phases": {"prefill.received": received, "prefill.compute_start": start}}


def test_queue_lengths_over_time_per_prefill() -> None:
    """p0: a at 0 starts at once, b at 0 waits until 1, c at 1 until 3; p1: d at 2 at once.
    Span 0..3: p0 waits 1 (b) over [0,1) and 1 (c) over [1,3) -> mean 3/3 = 1, max 1; wait
    means (0 + 1 + 2) / 3 = 1 s. A failed request is not counted."""
    rows = [row("x", "a", "p0", 0.0, 0.0), row("x", "b", "p0", 0.0, 1.0),
            row("x", "c", "p0", 1.0, 3.0, tokens=2_000), row("x", "d", "p1", 2.0, 2.0),
            {**row("x", "e", "p1", 0.0, 3.0), "error": "boom"}]
    got = queues(rows)["x"]
    assert got["p0"] == {"n": 3.0, "tokens": 4_000.0, "wait_ms": pytest.approx(1_000.0),
                         "mean_waiting": pytest.approx(1.0), "max_waiting": 1.0}
    assert got["p1"]["mean_waiting"] == 0.0 and got["p1"]["wait_ms"] == 0.0
    assert got["all"]["n"] == 4.0 and got["all"]["wait_ms"] == pytest.approx(750.0)


def test_round_robin_alternates_and_a_shared_prefix_is_skipped_once_computed() -> None:
    """Two prefills, model 32k tokens/s + 20 ms. Four 3,200-token prompts at t=0: round
    robin puts two on each, the second waits 0.12 s. The chooser does the same here (equal
    work, ties in turn)."""
    m = EngineModel()
    arrivals = [(0.0, 3_200, [i]) for i in range(4)]
    for rule in ("round_robin", "booked", "drained"):
        assert replay(arrivals, 2, rule, m) == pytest.approx([0, 0, 0.12, 0.12])
    # one prefill: the second prompt shares the first's 2 blocks but arrives before they
    # are computed (matched on receipt): no skip; the third, after, skips them
    shared = [(0.0, 1_024, [1, 2]), (0.0, 1_536, [1, 2, 3]), (1.0, 1_536, [1, 2, 3])]
    waits = replay(shared, 1, "round_robin", m)
    assert waits == pytest.approx([0.0, m.prefill_s(1_024), 0.0])


def test_the_drained_rule_sends_a_burst_to_a_prefill_about_to_finish() -> None:
    """Two prefills (model: 20 ms + tokens / 32k). A 1,000-token prompt at t=0 on p0,
    answered at 0.05325 s: rate 1,512 / 0.05325 = 28,394 tokens/s. A 64,000-token prompt at
    0.1 s (tie: in turn, p1; done at 2.12 s). At 2.0 s two 12,000-token prompts: the first
    goes to the idle p0 (12,512 < anything on p1). The second: booked work puts it behind the
    first on p0 (25,024 < 64,512 + 12,512), a 0.395 s wait; drained, p1 has 64,512 - 28,394 x
    1.9 = 10,563 left, 23,075 < 25,024, so it waits for p1's last 0.12 s instead."""
    m = EngineModel()
    arrivals = [(0.0, 1_000, [10]), (0.1, 64_000, [20]), (2.0, 12_000, [30]),
                (2.0, 12_000, [40])]
    booked = replay(arrivals, 2, "booked", m)
    drained = replay(arrivals, 2, "drained", m)
    assert booked == pytest.approx([0, 0, 0, m.prefill_s(12_000)])
    assert drained == pytest.approx([0, 0, 0, 0.1 + m.prefill_s(64_000) - 2.0])


def test_counterfactual_reports_the_measured_wait_beside_each_rule() -> None:
    rows = [row("x", "a", "p0", 0.0, 0.0, tokens=3_200),
            row("x", "b", "p0", 0.0, 0.12, tokens=3_200)]
    got = counterfactual(rows, {"a": [1], "b": [2]})["x"]
    assert got["measured"] == pytest.approx(60.0)
    # one prefill was seen, so every rule queues b behind a
    assert got["round_robin"] == got["booked"] == got["drained"] == pytest.approx(60.0)
    with pytest.raises(ValueError, match="rule"):
        replay([(0.0, 1, [])], 1, "fastest")
