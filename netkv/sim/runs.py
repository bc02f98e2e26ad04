"""Running many simulations, in sequence or on a process pool (fork), with progress.

Simulations (scenario, parsed and scaled trace) are built in the parent; workers inherit
them by fork and get only a key and a :class:`RunConfig`, and send back the per-request
arrays, so the trace is parsed once per command, never per job, and each simulation's
prefill plan (:mod:`netkv.sim.prefill_plan`, shared by every policy but the joint one and
every seed) is computed once, in the parent, before the workers start. The pool has one worker per
core this process may run on (``os.sched_getaffinity``) unless told otherwise, and takes the
largest jobs first so that no long job starts last.

A run is a pure function of (scenario, trace, config without its label): a run asked for
again in the same process (the matrix's sensitivity rows at the scenario's own values are
its scoring runs) is answered from a bounded memo instead of being simulated twice.
:data:`USAGE` counts the CPU seconds the runs took, wherever they ran.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import resource
import sys
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

from tqdm import tqdm

from netkv.sim.simulation import RunConfig, RunResult, Simulation

_SIMS: dict[Hashable, Simulation] = {}
MEMO_RUNS = 512  # results kept for reuse (about 0.6 MB each on the full score slice)


@dataclass
class Usage:
    """CPU seconds spent simulating (in this process and its workers) and run counts."""

    cpu_s: float = 0.0
    runs: int = 0
    reused: int = 0


USAGE = Usage()
_MEMO: OrderedDict[tuple[str, str, str], RunResult] = OrderedDict()
_DIGESTS: dict[int, tuple[Simulation, str]] = {}


def cpu_now() -> float:
    """CPU seconds (user + system) of this process and of its reaped children so far."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def default_jobs() -> int:
    """Cores this process may run on."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def _digest(sim: Simulation) -> str:
    """What a run's outcome depends on besides its config: the scenario and the trace."""
    hit = _DIGESTS.get(id(sim))
    if hit is not None and hit[0] is sim:
        return hit[1]
    h = hashlib.sha256(repr(sim.scenario.spec).encode())
    t = sim.trace
    for arr in (t.arrival_s, t.input_tokens, t.output_tokens):
        h.update(arr.tobytes())
    h.update(repr(t.hash_ids).encode())
    out = h.hexdigest()
    _DIGESTS[id(sim)] = (sim, out)
    return out


def _memo_key(sim: Simulation, config: RunConfig) -> tuple[str, str, str]:
    return (_digest(sim), repr(replace(config, label="")), config.policy)


def _cost(sim: Simulation, config: RunConfig) -> float:
    """A rough relative cost, for largest-first ordering only (measured: layer-wise runs
    about 2.5x a pull run; the joint policy about 1.5x before the prefill plan, which it does
    not use, so about 2x now)."""
    cost = float(len(sim.trace))
    if sim.scenario.spec.network.timing == "layerwise":
        cost *= 2.5
    if config.policy == "netkv_pair":
        cost *= 2.0
    return cost


def _run(sim: Simulation, config: RunConfig) -> tuple[RunResult, float]:
    cpu = time.process_time()
    result = sim.run(config)
    return result, time.process_time() - cpu


def _work(task: tuple[int, Hashable, RunConfig]) -> tuple[int, RunResult, float]:
    index, key, config = task
    result, cpu = _run(_SIMS[key], config)
    return index, result, cpu


def run_all(sims: dict[Hashable, Simulation], tasks: Sequence[tuple[Hashable, RunConfig]],
            jobs: int | None = None, show_progress: bool = True) -> list[RunResult]:
    """Run ``tasks`` (simulation key, config); results come back in task order.
    ``jobs``: worker processes (default: every core this process may use)."""
    jobs = default_jobs() if jobs is None else jobs
    results: list[RunResult | None] = [None] * len(tasks)
    todo: list[int] = []
    for i, (key, config) in enumerate(tasks):
        hit = _MEMO.get(_memo_key(sims[key], config))
        if hit is not None:
            results[i] = replace(hit, name=config.name)
            USAGE.reused += 1
        else:
            todo.append(i)
    todo.sort(key=lambda i: -_cost(sims[tasks[i][0]], tasks[i][1]))
    total = sum(len(sims[tasks[i][0]].trace) for i in todo)
    bar = tqdm(total=total, unit="req", file=sys.stderr, disable=not show_progress,
               desc="simulating", dynamic_ncols=True)

    def done(i: int, result: RunResult, cpu: float) -> None:
        results[i] = result
        USAGE.cpu_s += cpu
        USAGE.runs += 1
        key, config = tasks[i]
        _MEMO[_memo_key(sims[key], config)] = result
        while len(_MEMO) > MEMO_RUNS:
            _MEMO.popitem(last=False)

    try:
        if jobs <= 1 or len(todo) <= 1:
            for i in todo:
                key, config = tasks[i]
                bar.set_postfix_str(config.name)
                cpu = time.process_time()
                result = sims[key].run(config, progress=bar.update)
                done(i, result, time.process_time() - cpu)
        else:
            # Each simulation's prefill plan once, here, so every worker inherits it.
            for key in {tasks[i][0] for i in todo if tasks[i][1].policy != "netkv_pair"}:
                sims[key].prefill_plan()
            _SIMS.clear()
            _SIMS.update(sims)
            ctx = multiprocessing.get_context("fork")
            work = [(i, tasks[i][0], tasks[i][1]) for i in todo]
            with ctx.Pool(min(jobs, len(todo))) as pool:
                for i, result, cpu in pool.imap_unordered(_work, work):
                    done(i, result, cpu)
                    bar.update(len(sims[tasks[i][0]].trace))
                    bar.set_postfix_str(result.name)
                pool.close()
                pool.join()
    finally:
        bar.close()
        _SIMS.clear()
    return [r for r in results if r is not None]
