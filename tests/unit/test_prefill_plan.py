"""The prefill plan (:mod:`netkv.sim.prefill_plan`) replays the prefill side exactly.

Each run of a policy other than ``netkv_pair`` takes its prefill choices, hits, compute
times and KV-store fetches from a plan computed once per simulation. Here the same runs are
done with the plan and with the run doing that work itself (the code path ``netkv_pair``
still takes), and every per-request array, byte count and the event order must be equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import conversation_trace

from netkv.sim.events import EventQueue, Kind
from netkv.sim.scenario import load_scenario
from netkv.sim.simulation import RunConfig, RunResult, Simulation
from netkv.workload.trace import load_trace

pytestmark = pytest.mark.unit

ARRAYS = ("ttft_s", "tbt_s", "transfer_s", "queue_s", "prefill_s", "kv_bytes", "tier",
          "completions", "predicted_ttft_s")


def _run(sim: Simulation, config: RunConfig, *, planned: bool,
         monkeypatch: pytest.MonkeyPatch) -> tuple[RunResult, list[tuple[float, int]]]:
    log: list[tuple[float, int]] = []
    push = EventQueue.push

    def logged(self: EventQueue, t: float, kind: Kind, a: int,
               b: int = 0) -> None:
        log.append((t, int(kind)))
        push(self, t, kind, a, b)

    with monkeypatch.context() as m:
        m.setattr(EventQueue, "push", logged)
        if not planned:
            m.setattr(Simulation, "prefill_plan", lambda self: None)
        return sim.run(config), log


@pytest.mark.parametrize(("scenario", "policy"), [
    ("fat-tree-64", "netkv"), ("fat-tree-64", "round_robin"),
    ("fat-tree-64-layerwise", "netkv"), ("xpyd-3p1d-rails", "llmd_weighted"),
    ("fat-tree-64-inelastic", "cache_aware"), ("cross-dc-100g", "netkv"),
])
def test_plan_replays_the_prefill_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       scenario: str, policy: str) -> None:
    trace = load_trace(conversation_trace(tmp_path / "t.jsonl", n=200, span_s=30.0))
    sc = load_scenario(scenario)
    sim = Simulation(sc, trace.scaled(sc.spec.rate_scale, sc.spec.length_scale))
    config = RunConfig(policy, {}, seed=2)
    sim.prefill_plan()  # before the events are logged: the plan runs a queue of its own
    planned, planned_log = _run(sim, config, planned=True, monkeypatch=monkeypatch)
    plain, plain_log = _run(Simulation(sc, sim.trace), config, planned=False,
                            monkeypatch=monkeypatch)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(planned, name), getattr(plain, name),
                                      err_msg=name)
    assert planned.requested_bytes == plain.requested_bytes
    assert planned.delivered_bytes == plain.delivered_bytes
    assert planned_log == plain_log
    plan = sim.prefill_plan()
    assert plan is not None and (plan.prefill >= 0).all()
    # The scenario's fetches from the KV store are in the plan when the scenario has them.
    if sc.spec.background.model == "elastic" and sc.spec.background.prefix_fetch:
        assert any(plan.fetches)


def test_joint_policy_does_its_own_prefill(tmp_path: Path) -> None:
    """netkv_pair chooses the prefill instance itself: its run never asks for the plan."""
    trace = load_trace(conversation_trace(tmp_path / "t.jsonl", n=60))
    sc = load_scenario("fat-tree-64")
    sim = Simulation(sc, trace.scaled(sc.spec.rate_scale, sc.spec.length_scale))
    sim.run(RunConfig("netkv_pair", {}, seed=1))
    assert sim._plan is None
