"""Running many simulations, in sequence or on a small process pool (fork), with progress.

Simulations are built in the parent; workers inherit them by fork and get only a key and a
:class:`RunConfig`, and send back the per-request arrays.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Hashable, Sequence

from tqdm import tqdm

from netkv.sim.simulation import RunConfig, RunResult, Simulation

_SIMS: dict[Hashable, Simulation] = {}


def _work(task: tuple[int, Hashable, RunConfig]) -> tuple[int, RunResult]:
    index, key, config = task
    return index, _SIMS[key].run(config)


def run_all(sims: dict[Hashable, Simulation], tasks: Sequence[tuple[Hashable, RunConfig]],
            jobs: int = 1, show_progress: bool = True) -> list[RunResult]:
    """Run ``tasks`` (simulation key, config); results come back in task order."""
    total = sum(len(sims[key].trace) for key, _ in tasks)
    bar = tqdm(total=total, unit="req", file=sys.stderr, disable=not show_progress,
               desc="simulating", dynamic_ncols=True)
    results: list[RunResult | None] = [None] * len(tasks)
    try:
        if jobs <= 1 or len(tasks) <= 1:
            for i, (key, config) in enumerate(tasks):
                bar.set_postfix_str(config.name)
                results[i] = sims[key].run(config, progress=bar.update)
        else:
            _SIMS.clear()
            _SIMS.update(sims)
            ctx = multiprocessing.get_context("fork")
            work = [(i, key, config) for i, (key, config) in enumerate(tasks)]
            with ctx.Pool(min(jobs, len(tasks))) as pool:
                for i, result in pool.imap_unordered(_work, work):
                    results[i] = result
                    bar.update(len(sims[tasks[i][0]].trace))
                    bar.set_postfix_str(result.name)
    finally:
        bar.close()
        _SIMS.clear()
    return [r for r in results if r is not None]
