"""The simulator's numbers are pinned bit for bit: speed-ups must not move them.

Each case runs one frozen scenario (``tests/unit/golden/*.yaml``: copies, base merged, of the
shipped scenarios as of main fbe3cb8) x policy x seed on a small trace and compares against
golden figures recorded from the code *before* the performance work (main fbe3cb8):

* a SHA-256 of every per-request array of the :class:`RunResult` (TTFT, TBT, transfer,
  queue, prefill, KV bytes, tier, completions, predicted TTFT) and of the requested and
  delivered byte totals, and the mean TTFT as a float hex for a readable diff;
* a SHA-256 of the *event ordering*: every event the run's handlers act on, as
  ``(time, kind, a, b)`` in the order handled (flow and decode events superseded by a later
  version are not counted: they do nothing, so dropping them is not a change; their version
  numbers are not compared either).

The synthetic cases run in a few seconds. With ``NETKV_TRACE`` set (the Mooncake
conversation trace), short slices of the real trace are checked too; without it those are
skipped, saying why. To re-record (only when a behaviour change is *intended*, from the code
that defines the reference): ``python -m tests.unit.test_sim_golden --write [--trace T]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import conversation_trace

from netkv.sim import runs, stages
from netkv.sim.events import Kind
from netkv.sim.scenario import load_scenario
from netkv.sim.simulation import RunConfig, RunResult, Simulation
from netkv.workload.trace import Trace, load_trace

pytestmark = pytest.mark.unit

HERE = Path(__file__).with_name("golden")
GOLDEN = HERE / "sim_golden.json"

# (scenario, policy item, seed): every scenario of the matrix, the baselines that exercise
# different code paths, netkv with each oracle. Not netkv_pair: that policy is being changed
# on purpose (the scoring work), and these figures pin the engine, not the policies.
SYNTH_CASES: list[tuple[str, str, int]] = [
    ("fat-tree-64", "round_robin", 1), ("fat-tree-64", "netkv", 1),
    ("fat-tree-64", "netkv", 2), ("fat-tree-64", "netkv@truth", 1),
    ("fat-tree-64", "netkv@static", 1), ("fat-tree-64", "llmd_weighted", 1),
    ("fat-tree-64", "power_of_two", 2), ("fat-tree-64", "cache_aware", 3),
    ("cluster-32n", "round_robin", 1), ("cluster-32n", "netkv", 2),
    ("fat-tree-64-faults", "netkv", 1), ("fat-tree-64-faults", "round_robin", 2),
    ("fat-tree-64-inelastic", "netkv", 1), ("fat-tree-64-inelastic", "round_robin", 1),
    ("fat-tree-64-layerwise", "round_robin", 2), ("fat-tree-64-layerwise", "netkv", 1),
    ("xpyd-3p1d-rails", "llmd_weighted", 1), ("xpyd-3p1d-rails", "netkv", 2),
    ("cross-dc-100g", "netkv", 1), ("cross-dc-100g", "dynamo_disagg", 1),
    ("a800-64", "power_of_two", 1), ("a800-64", "netkv@truth", 2),
    ("fat-tree-64-split", "llmd_prefill_first", 1), ("fat-tree-64-split", "cache_load", 1),
]
REAL_CASES: list[tuple[str, str, int]] = [
    ("fat-tree-64", "round_robin", 1), ("fat-tree-64", "netkv", 2),
    ("fat-tree-64", "netkv@truth", 1), ("cluster-32n", "netkv", 1),
    ("cluster-32n", "round_robin", 2), ("fat-tree-64-faults", "netkv", 1),
    ("fat-tree-64-inelastic", "llmd_weighted", 1), ("fat-tree-64-layerwise", "round_robin", 1),
    ("xpyd-3p1d-rails", "netkv", 1), ("cross-dc-100g", "round_robin", 1),
    ("a800-64", "netkv@static", 3), ("fat-tree-64-split", "netkv", 1),
]
# Policy parameters whose defaults changed on purpose since the reference (main fbe3cb8).
PINNED_PARAMS: dict[str, dict[str, Any]] = {"netkv": {"tie_rule": "tier"}}
REAL_SLICE = (0.5, 0.53)  # fractions of the trace's time span (about 360 requests)
HANDLERS = {Kind.ARRIVAL: "arrival", Kind.PREFILL_DONE: "prefill_done", Kind.FLOW: "flow",
            Kind.DECODE: "decode", Kind.BACKGROUND: "background", Kind.HANDOVER: "handover",
            Kind.FAULT: "fault", Kind.TENANT: "tenant", Kind.WEIGHTS: "weights",
            Kind.SAMPLE: "sample"}


def real_slice(trace: Trace) -> Trace:
    """Requests arriving in ``REAL_SLICE`` of the span, rebased to 0 (as the matrix does)."""
    span = float(trace.arrival_s[-1]) or 1.0
    lo, hi = REAL_SLICE
    keep = np.flatnonzero((trace.arrival_s >= lo * span) & (trace.arrival_s < hi * span))
    first, last = int(keep[0]), int(keep[-1]) + 1
    return Trace(trace.path, trace.arrival_s[first:last] - trace.arrival_s[first],
                 trace.input_tokens[first:last], trace.output_tokens[first:last],
                 trace.hash_ids[first:last])


@contextmanager
def event_log() -> Iterator[list[tuple[float, int, int, int]]]:
    """Record every event a :class:`~netkv.sim.stages.Run` acts on, in order."""
    log: list[tuple[float, int, int, int]] = []
    saved: dict[str, Any] = {}

    def wrap(kind: Kind, name: str) -> Callable[..., None]:
        inner = saved[name]

        def handler(self: Any, now: float, a: int, b: int) -> None:
            stale = ((kind == Kind.FLOW and a != self.fabric.version)
                     or (kind == Kind.DECODE and b != self.decodes.decoders[a].version))
            if not stale:
                # Version counters are bookkeeping, not behaviour: a flow event is logged
                # as (time, FLOW, 0, 0), a decode event as (time, DECODE, decoder, 0).
                log.append((now, int(kind), 0 if kind == Kind.FLOW else a,
                            0 if kind in (Kind.FLOW, Kind.DECODE) else b))
            inner(self, now, a, b)
        return handler

    for name in HANDLERS.values():
        saved[name] = getattr(stages.Run, name)
    try:
        for kind, name in HANDLERS.items():
            setattr(stages.Run, name, wrap(kind, name))
        yield log
    finally:
        for name, fn in saved.items():
            setattr(stages.Run, name, fn)


def fingerprint(result: RunResult, log: list[tuple[float, int, int, int]]) -> dict[str, Any]:
    h = hashlib.sha256()
    for arr in (result.ttft_s, result.tbt_s, result.transfer_s, result.queue_s,
                result.prefill_s, result.kv_bytes, result.tier, result.completions,
                result.predicted_ttft_s):
        flat = np.ascontiguousarray(arr)
        h.update(str(flat.dtype).encode())
        h.update(flat.tobytes())
    h.update(struct.pack("<dd", result.requested_bytes, result.delivered_bytes))
    e = hashlib.sha256()
    for t, kind, a, b in log:
        e.update(struct.pack("<dqqq", t, kind, a, b))
    return {"results_sha256": h.hexdigest(), "events_sha256": e.hexdigest(),
            "events": len(log), "ttft_mean": float(np.nanmean(result.ttft_s)).hex(),
            "delivered_bytes": float(result.delivered_bytes).hex()}


def run_case(trace: Trace, scenario: str, item: str, seed: int) -> dict[str, Any]:
    sc = load_scenario(str(HERE / f"{scenario}.yaml"))
    sim = Simulation(sc, trace.scaled(sc.spec.rate_scale, sc.spec.length_scale))
    name, _, oracle = item.partition("@")
    # netkv's default tie rule changed after these figures were recorded (a policy change,
    # not an engine one): the cases keep the rule of the reference code, so they still pin
    # the engine against the pre-optimisation figures.
    params = dict(PINNED_PARAMS.get(name, {}))
    config = RunConfig(name, params, oracle or "telemetry", label=item, seed=seed)  # type: ignore[arg-type]
    with event_log() as log:
        result = sim.run(config)
    return fingerprint(result, log)


def key(scenario: str, item: str, seed: int) -> str:
    return f"{scenario}|{item}|{seed}"


def golden() -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Trace:
    path = conversation_trace(tmp_path_factory.mktemp("golden") / "trace.jsonl")
    return load_trace(path).scaled(rate_scale=4.0)  # compressed: flows overlap


@pytest.mark.parametrize(("scenario", "item", "seed"), SYNTH_CASES)
def test_synthetic_runs_match_the_pre_optimisation_figures(
        synth: Trace, scenario: str, item: str, seed: int) -> None:
    want = golden()["synthetic"][key(scenario, item, seed)]
    assert run_case(synth, scenario, item, seed) == want


@pytest.fixture(scope="module")
def real() -> Trace:
    path = os.environ.get("NETKV_TRACE") or os.environ.get("TRACE")
    if not path:
        print("skipping the real-trace golden cases: NETKV_TRACE (or TRACE) is not set")
        pytest.skip("NETKV_TRACE (or TRACE) not set: real-trace golden cases need the "
                    "Mooncake conversation trace")
    trace = load_trace(path)
    want = golden()["real"]["_trace"]
    if len(trace) != want["requests"]:
        pytest.skip(f"NETKV_TRACE has {len(trace)} requests, the golden figures were taken "
                    f"on the conversation trace ({want['requests']})")
    return real_slice(trace)


@pytest.mark.parametrize(("scenario", "item", "seed"), REAL_CASES)
def test_real_trace_slices_match_the_pre_optimisation_figures(
        real: Trace, scenario: str, item: str, seed: int) -> None:
    want = golden()["real"][key(scenario, item, seed)]
    assert run_case(real, scenario, item, seed) == want


def test_default_jobs_is_every_usable_core() -> None:
    assert runs.default_jobs() == len(os.sched_getaffinity(0))


def test_pool_results_in_task_order_and_repeats_reused(tmp_path: Path) -> None:
    trace = load_trace(conversation_trace(tmp_path / "t.jsonl", n=60)).scaled(rate_scale=4.0)
    small = Simulation(load_scenario(str(HERE / "fat-tree-64.yaml")), trace)
    split = Simulation(load_scenario(str(HERE / "fat-tree-64-layerwise.yaml")), trace)
    sims: dict[Hashable, Simulation] = {"a": small, "b": split}
    tasks = [("a", RunConfig("round_robin", seed=1)), ("b", RunConfig("netkv", seed=1)),
             ("a", RunConfig("netkv", seed=2, label="n2"))]
    serial = [s.run(c) for s, c in ((sims[k], c) for k, c in tasks)]
    runs._MEMO.clear()
    before = runs.USAGE.runs
    pooled = runs.run_all(sims, tasks, jobs=2, show_progress=False)
    assert runs.USAGE.runs - before == 3 and runs.USAGE.cpu_s > 0
    for want, got in zip(serial, pooled, strict=True):
        assert got.name == want.name
        np.testing.assert_array_equal(got.ttft_s, want.ttft_s)
        np.testing.assert_array_equal(got.tier, want.tier)
    # The same run again under another label: answered from the memo, renamed.
    reused = runs.USAGE.reused
    again = runs.run_all(sims, [("a", RunConfig("round_robin", seed=1, label="rr"))],
                         jobs=2, show_progress=False)
    assert runs.USAGE.reused == reused + 1 and again[0].name == "rr"
    np.testing.assert_array_equal(again[0].ttft_s, serial[0].ttft_s)
    # A different seed is a different run.
    simulated = runs.USAGE.runs
    runs.run_all(sims, [("a", RunConfig("round_robin", seed=3))], jobs=1, show_progress=False)
    assert runs.USAGE.reused == reused + 1 and runs.USAGE.runs == simulated + 1


def test_vectorised_prefill_times_equal_the_scalar_model_exactly() -> None:
    sim = Simulation(load_scenario(str(HERE / "a800-64.yaml")),
                     Trace("t", np.zeros(2), np.array([900, 40_000]), np.array([5, 5]),
                           ((0, 1), (0, 2))))
    rng = np.random.default_rng(4)
    n = len(sim.prefill_gpus)
    for tokens in (1, 511, 512, 3_000, 40_000, 123_457):
        hits = rng.integers(0, tokens // 512 + 3, n)
        want = [sim.prefill_time(p, tokens, int(hits[p])) for p in range(n)]
        assert sim.prefill_times(tokens, hits).tolist() == want  # exact


def _write(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="re-record the golden figures")
    parser.add_argument("--write", action="store_true", required=True)
    parser.add_argument("--trace", default=None, help="the conversation trace (real cases)")
    args = parser.parse_args(argv)
    import tempfile
    out: dict[str, dict[str, Any]] = {"synthetic": {}, "real": {}}
    with tempfile.TemporaryDirectory() as tmp:
        trace = load_trace(conversation_trace(Path(tmp) / "t.jsonl")).scaled(rate_scale=4.0)
        for case in SYNTH_CASES:
            out["synthetic"][key(*case)] = run_case(trace, *case)
            print(key(*case), out["synthetic"][key(*case)]["events"], flush=True)
    if args.trace:
        full = load_trace(args.trace)
        out["real"]["_trace"] = {"requests": len(full)}
        part = real_slice(full)
        for case in REAL_CASES:
            out["real"][key(*case)] = run_case(part, *case)
            print(key(*case), out["real"][key(*case)]["events"], flush=True)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_write(sys.argv[1:]))
