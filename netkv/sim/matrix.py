"""``netkv sim matrix``: every scenario x every policy x several seeds, with 95% CIs.

1. **Tune** each baseline's weights per scenario on a *tuning slice* of the trace (the first
   ``--tune-slice`` of its time span; one seed), objective mean TTFT.
2. **Score** every policy, the baselines with their tuned weights, on a *different scoring
   slice* (``--score-slice``, later in the trace), once per seed (background schedule,
   telemetry noise and ECMP hashing change with the seed).
3. **Compare** per scenario: mean and p99 TTFT and SLO attainment as mean +- 95% CI over the
   seeds; ``netkv`` against the best baseline (the baseline with the lowest mean TTFT on the
   scoring slice, which favours the baselines), against ``netkv@static`` and against
   round-robin, paired by seed; a verdict (win / tie / loss) only beyond the interval.
4. **Sensitivity** of the headline (the scenario with netkv's largest gain over the best
   baseline) to the most influential stated choices: hot-spot dwell, hot fraction and the
   fixed handover cost.

Writes ``matrix.json``, ``matrix.md`` and ``matrix.png`` into ``--out`` and prints the
markdown and the wall time with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Hashable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from netkv.errors import InputError
from netkv.sim.matrix_report import markdown, plot
from netkv.sim.report import summarise, write_json
from netkv.sim.runs import USAGE, cpu_now, default_jobs, run_all
from netkv.sim.scenario import Scenario, load_scenario
from netkv.sim.simulation import RunConfig, RunResult, Simulation
from netkv.sim.stats import ci95, paired, reduction_pct, verdict
from netkv.workload.trace import Trace, load_trace

SCENARIOS = ("fat-tree-64", "a800-64", "fat-tree-64-split", "xpyd-3p1d-rails", "cluster-32n",
             "cross-dc-100g", "fat-tree-64-faults", "fat-tree-64-layerwise",
             "fat-tree-64-inelastic")
BASELINES = ("round_robin", "power_of_two", "cache_aware", "cache_load", "dynamo_disagg",
             "llmd_weighted", "llmd_prefill_first")
NETKV = ("netkv@static", "netkv", "netkv_pair", "netkv@truth")
SUBJECT = "netkv"
TIE_PCT = 0.1  # differences under 0.1% (mean TTFT) or 0.1 points (SLO) are ties
METRICS = ("ttft_mean_s", "ttft_p99_s", "slo_attainment", "after_prefill_mean_s")
GRID: dict[str, list[dict[str, Any]]] = {
    "cache_load": [{"prefill_load_scale": w} for w in (0.0, 1.0, 4.0)],
    "cache_aware": [{"cache_threshold": c} for c in (0.1, 0.3, 0.6)],
    "dynamo_disagg": [{"taint_weight": w} for w in (0.0, 0.5, 0.9)],
    "llmd_weighted": [{"queue_weight": 1.0, "kv_weight": 2.0, "prefix_weight": 3.0,
                       "topology_weight": t} for t in (0.0, 1.0, 4.0)],
    "llmd_prefill_first": [{"topology_weight": t} for t in (0.0, 1.0, 4.0)],
}
# Sensitivity knobs: (label, RunConfig field or scenario override, values).
DWELL_S = (0.1, 3.0, 30.0, 300.0)
HOT = (0.5, 1.0, 2.0)
HANDOVER_S = (0.0, 0.05, 0.2)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seeds", type=int, default=5, help="seeds per cell (>= 2)")
    parser.add_argument("--tune-slice", default="0,0.2",
                        help="fractions of the trace's time span for tuning (default 0,0.2)")
    parser.add_argument("--score-slice", default="0.5,1",
                        help="fractions of the trace's time span for scoring (default 0.5,1)")
    parser.add_argument("--no-sensitivity", action="store_true",
                        help="skip the headline's sensitivity sweeps")
    parser.add_argument("--tuned", default=None,
                        help="reuse the tuned baseline weights of an earlier matrix.json "
                        "(or matrix.partial.json) instead of tuning again")
    parser.add_argument("--combine", default=None,
                        help="comma-separated matrix.json files: merge their per-seed cells "
                        "(later files win per scenario and policy) into --out, no simulation")


def slice_trace(trace: Trace, lo: float, hi: float) -> Trace:
    """Requests arriving in ``[lo, hi)`` of the trace's span, arrivals rebased to 0."""
    span = float(trace.arrival_s[-1]) or 1.0
    keep = np.flatnonzero((trace.arrival_s >= lo * span) & (
        (trace.arrival_s < hi * span) if hi < 1 else np.ones(len(trace), bool)))
    if keep.shape[0] < 2:
        raise InputError("--score-slice", f"slice {lo},{hi} holds fewer than two requests")
    first, last = int(keep[0]), int(keep[-1]) + 1
    return Trace(trace.path, trace.arrival_s[first:last] - trace.arrival_s[first],
                 trace.input_tokens[first:last], trace.output_tokens[first:last],
                 trace.hash_ids[first:last])


def _fractions(text: str, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise InputError(flag, f"expected two fractions LO,HI, got {text!r}") from None
    if not 0 <= lo < hi <= 1:
        raise InputError(flag, f"need 0 <= LO < HI <= 1, got {text!r}")
    return lo, hi


def _config(item: str, params: dict[str, Any] | None = None, **knobs: Any) -> RunConfig:
    name, _, oracle = item.partition("@")
    kind: Any = oracle or "telemetry"
    return RunConfig(name, dict(params or {}), kind, label=item, **knobs)


Task = tuple[Hashable, RunConfig]


def simulations(scenarios: dict[str, Scenario], trace: Trace,
                tag: str) -> dict[Hashable, Simulation]:
    """One simulation per scenario over ``trace`` (scaled as the scenario says), keyed
    ``(tag, scenario)``."""
    return {(tag, name): Simulation(sc, trace.scaled(sc.spec.rate_scale, sc.spec.length_scale))
            for name, sc in scenarios.items()}


def tune_tasks(scenarios: dict[str, Scenario]) -> list[Task]:
    """Every baseline's grid on every scenario's tuning simulation (key ``("tune", name)``)."""
    return [(("tune", name), RunConfig(policy, params, label=f"{policy}#{i}"))
            for name in scenarios for policy, grid in GRID.items()
            for i, params in enumerate(grid)]


def pick_tuned(scenarios: dict[str, Scenario], tasks: Sequence[Task],
               results: Sequence[RunResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """Best params per scenario and baseline on the tuning slice (objective mean TTFT)."""
    best: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in scenarios}
    score: dict[tuple[str, str], float] = {}
    for (key, c), r in zip(tasks, results, strict=True):
        mean = float(np.nanmean(r.ttft_s))
        name = str(key[1])  # type: ignore[index]
        if mean < score.get((name, c.policy), np.inf):
            score[(name, c.policy)] = mean
            best[name][c.policy] = dict(c.params)
    return best


def tune(scenarios: dict[str, Scenario], trace: Trace, jobs: int,
         progress: bool) -> dict[str, dict[str, dict[str, Any]]]:
    """Best params per scenario and baseline on the tuning slice (objective mean TTFT)."""
    tasks = tune_tasks(scenarios)
    return pick_tuned(scenarios, tasks,
                      run_all(simulations(scenarios, trace, "tune"), tasks, jobs, progress))


def needs_tuning(item: str) -> bool:
    """Whether ``item``'s scoring runs need the tuned weights (its policy has a grid)."""
    return item.partition("@")[0] in GRID


def score_tasks(scenarios: dict[str, Scenario], policies: Sequence[str],
                tuned: dict[str, dict[str, dict[str, Any]]], *, seeds: int) -> list[Task]:
    """Every policy x seed on every scenario's scoring simulation (key ``("score", name)``);
    a policy with a grid takes its tuned weights from ``tuned``."""
    return [(("score", name), _config(item, tuned.get(name, {}).get(item.partition("@")[0], {}),
                                      seed=seed))
            for name in scenarios for item in policies for seed in range(1, seeds + 1)]


def add_cells(cells: dict[str, dict[str, list[dict[str, float]]]],
              scenarios: dict[str, Scenario], tasks: Sequence[Task],
              results: Sequence[RunResult]) -> None:
    """Summarise scoring results into ``cells`` (scenario -> policy -> one row per seed)."""
    for (key, c), r in zip(tasks, results, strict=True):
        name = str(key[1])  # type: ignore[index]
        s = summarise(r, scenarios[name].spec.slo.tbt_s)
        cells.setdefault(name, {}).setdefault(c.name, []).append(
            {m: float(s[m]) for m in METRICS})


def score(scenarios: dict[str, Scenario], trace: Trace, policies: Sequence[str],
          tuned: dict[str, dict[str, dict[str, Any]]], *, seeds: int, jobs: int,
          progress: bool) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Per scenario and policy, one summary per seed on the scoring slice."""
    tasks = score_tasks(scenarios, policies, tuned, seeds=seeds)
    results = run_all(simulations(scenarios, trace, "score"), tasks, jobs, progress)
    out: dict[str, dict[str, list[dict[str, float]]]] = {n: {} for n in scenarios}
    add_cells(out, scenarios, tasks, results)
    return out


def ordered_cells(cells: dict[str, dict[str, list[dict[str, float]]]], names: Sequence[str],
                  policies: Sequence[str]) -> dict[str, dict[str, list[dict[str, float]]]]:
    """``cells`` in scenario order and, within a scenario, in the order of ``policies``
    (their labels), whatever order the runs finished in."""
    labels = [_config(p).name for p in policies]
    return {n: {p: cells[n][p] for p in labels if p in cells.get(n, {})} for n in names
            if n in cells}


def get(rows: list[dict[str, float]], metric: str) -> list[float]:
    return [row[metric] for row in rows]


def compare(cells: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """One scenario's table: intervals per policy, the best baseline, netkv's comparisons."""
    table = {p: {m: ci95([row[m] for row in rows]).as_dict() for m in METRICS}
             for p, rows in cells.items()}
    baselines = [p for p in cells if p in BASELINES]
    best = min(baselines, key=lambda p: table[p]["ttft_mean_s"]["mean"]) if baselines else None
    vs: dict[str, Any] = {}
    if SUBJECT in cells:
        me = cells[SUBJECT]
        for label, other in (("best_baseline", best), ("static", "netkv@static"),
                             ("round_robin", "round_robin")):
            if other is None or other not in cells:
                continue
            them = cells[other]
            mean_red = reduction_pct(get(me, "ttft_mean_s"), get(them, "ttft_mean_s"))
            slo_diff = paired([100 * v for v in get(me, "slo_attainment")],
                              [100 * v for v in get(them, "slo_attainment")])
            vs[label] = {
                "policy": other,
                "ttft_mean_reduction_pct": mean_red.as_dict(),
                "ttft_p99_reduction_pct": reduction_pct(get(me, "ttft_p99_s"),
                                                        get(them, "ttft_p99_s")).as_dict(),
                "slo_points": slo_diff.as_dict(),
                "verdict_mean_ttft": verdict(mean_red, lower_is_better=False, eps=TIE_PCT),
                "verdict_slo": verdict(slo_diff, lower_is_better=False, eps=TIE_PCT),
            }
    return {"policies": table, "best_baseline": best, "netkv_vs": vs}


def headline(tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The largest gains of netkv over round-robin and over the best baseline, per metric,
    with the scenario where each occurs."""
    out: dict[str, Any] = {}
    for against in ("round_robin", "best_baseline"):
        for metric in ("ttft_mean_reduction_pct", "ttft_p99_reduction_pct", "slo_points"):
            best_name, best_val = None, -np.inf
            for name, t in tables.items():
                entry = t["netkv_vs"].get(against)
                if entry is not None and entry[metric]["mean"] > best_val:
                    best_name, best_val = name, entry[metric]["mean"]
            if best_name is not None:
                entry = tables[best_name]["netkv_vs"][against]
                out[f"{against}.{metric}"] = {"scenario": best_name, "policy": entry["policy"],
                                              **entry[metric]}
    return out


def sensitivity(scenario_name: str, trace: Trace, policies: Sequence[str],
                tuned: dict[str, dict[str, Any]], *, seeds: int, jobs: int,
                progress: bool) -> dict[str, Any]:
    """The headline scenario under other values of its three most influential choices."""
    sims: dict[Hashable, Simulation] = {}
    tasks: list[tuple[Hashable, RunConfig]] = []
    base = load_scenario(scenario_name)
    scaled = trace.scaled(base.spec.rate_scale, base.spec.length_scale)
    sims["base"] = Simulation(base, scaled)
    median = base.spec.background.tenants.dwell_median_s
    knobs: list[tuple[str, float, Hashable, dict[str, Any]]] = []
    knobs += [("dwell_median_s", x, "base", {"dwell_scale": x / median}) for x in DWELL_S]
    knobs += [("hot_fraction_x", x, "base", {"congestion": x}) for x in HOT]
    for x in HANDOVER_S:
        key: Hashable = ("handover", x)
        sims[key] = Simulation(load_scenario(scenario_name, {"network": {"handover_s": x}}),
                               scaled)
        knobs.append(("handover_s", x, key, {}))
    for knob, x, key, fields in knobs:
        for item in policies:
            params = tuned.get(item.partition("@")[0], {})
            for seed in range(1, seeds + 1):
                tasks.append((key, replace(_config(item, params, seed=seed),
                                           label=f"{knob}={x:g}|{item}", **fields)))
    results = run_all(sims, tasks, jobs, progress)
    cells: dict[str, dict[str, list[dict[str, float]]]] = {}
    for (_, c), r in zip(tasks, results, strict=True):
        knob_value, item = c.label.split("|")
        s = summarise(r, base.spec.slo.tbt_s)
        cells.setdefault(knob_value, {}).setdefault(item, []).append(
            {m: float(s[m]) for m in METRICS})
    return {"scenario": scenario_name, "rows": {k: compare(v) for k, v in cells.items()},
            "cells": cells}


def load_report(path: str, flag: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(flag, f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tuned"), dict):
        raise InputError(flag, f"{path} is not a matrix.json (no 'tuned' weights)")
    return data


def run(args: argparse.Namespace) -> int:
    wall = time.perf_counter()
    cpu = cpu_now()
    load_start = os.getloadavg()
    if args.seeds < 2:
        raise InputError("--seeds", "at least 2 seeds are needed for an interval")
    tune_lo, tune_hi = _fractions(args.tune_slice, "--tune-slice")
    score_lo, score_hi = _fractions(args.score_slice, "--score-slice")
    if tune_hi > score_lo and score_hi > tune_lo:
        raise InputError("--tune-slice", "the tuning and scoring slices must not overlap")
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    scenarios = {n: load_scenario(n) for n in names}
    policies = [p.strip() for p in (args.policies or ",".join(BASELINES + NETKV)).split(",")]
    full = load_trace(args.trace, limit=args.limit)
    tune_trace = slice_trace(full, tune_lo, tune_hi)
    score_trace = slice_trace(full, score_lo, score_hi)
    progress = not args.no_progress
    out = Path(args.out)
    # Two phases, each one pool over every scenario, largest runs first, so both cores stay
    # busy to the end of each: (1) the baselines' tuning grid together with the scoring
    # runs of the policies that take no tuned weights (netkv's, round-robin,
    # power-of-two); (2) the tuned baselines' scoring runs. Checkpointed after each.
    sims = simulations(scenarios, score_trace, "score")
    untuned = [p for p in policies if not needs_tuning(p)]
    tuned_items = [p for p in policies if needs_tuning(p)]
    tuned: dict[str, dict[str, dict[str, Any]]] = {}
    t_tasks: list[Task] = []
    if args.tuned:
        prior = load_report(args.tuned, "--tuned")["tuned"]
        missing = [n for n in names if n not in prior]
        if missing:
            raise InputError("--tuned", f"{args.tuned} has no tuned weights for {missing}")
        tuned = {n: prior[n] for n in names}
        untuned, tuned_items = list(policies), []
    elif tuned_items:
        t_tasks = tune_tasks(scenarios)
        sims.update(simulations(scenarios, tune_trace, "tune"))
    first = score_tasks(scenarios, untuned, tuned, seeds=args.seeds)
    results = run_all(sims, t_tasks + first, args.jobs, progress)
    if t_tasks:
        tuned = pick_tuned(scenarios, t_tasks, results[:len(t_tasks)])
    all_cells: dict[str, dict[str, list[dict[str, float]]]] = {}
    add_cells(all_cells, scenarios, first, results[len(t_tasks):])

    def checkpoint() -> dict[str, dict[str, Any]]:
        cells = ordered_cells(all_cells, names, policies)
        tables = {n: compare(c) for n, c in cells.items()}
        write_json(out / "matrix.partial.json", {"tuned": tuned, "scenarios": tables,
                                                 "cells": cells,
                                                 "wall_s": time.perf_counter() - wall})
        return tables

    checkpoint()
    if tuned_items:
        second = score_tasks(scenarios, tuned_items, tuned, seeds=args.seeds)
        add_cells(all_cells, scenarios, second, run_all(sims, second, args.jobs, progress))
    tables = checkpoint()
    all_cells = ordered_cells(all_cells, names, policies)
    head = headline(tables)
    sens = None
    if not args.no_sensitivity and head and "netkv" in policies:
        where = head.get("best_baseline.ttft_mean_reduction_pct", {}).get("scenario", names[0])
        best = tables[where]["best_baseline"]
        sens_policies = list(dict.fromkeys(
            p for p in ("round_robin", best, "netkv@static", "netkv") if p in policies))
        sens = sensitivity(where, score_trace, sens_policies, tuned[where], seeds=args.seeds,
                           jobs=args.jobs, progress=progress)
    wall = time.perf_counter() - wall
    report: dict[str, Any] = {
        "trace": str(args.trace), "tune_slice": [tune_lo, tune_hi],
        "score_slice": [score_lo, score_hi], "tune_requests": len(tune_trace),
        "score_requests": len(score_trace), "seeds": args.seeds, "jobs": args.jobs,
        "wall_s": wall, "cpus": os.cpu_count(), "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()), "tuned": tuned, "scenarios": tables,
        "cells": all_cells,
        "headline": head, "sensitivity": sens,
        "scenario_descriptions": {n: s.spec.description for n, s in scenarios.items()},
    }
    report["cpu_s"] = cpu = cpu_now() - cpu
    report["runs"] = {"simulated": USAGE.runs, "reused": USAGE.reused,
                      "simulating_cpu_s": USAGE.cpu_s}
    write_json(out / "matrix.json", report)
    text = markdown(report)
    (out / "matrix.md").write_text(text, encoding="utf-8")
    plot(out / "matrix.png", report)
    print(text)
    print(f"matrix: {len(scenarios)} scenarios x {len(policies)} policies x {args.seeds} seeds "
          f"in {wall:.0f} s wall, {cpu:.0f} s CPU ({USAGE.runs} runs simulated, "
          f"{USAGE.reused} reused; {args.jobs} jobs on {default_jobs()} usable cores; "
          f"load average {load_start[0]:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end); wrote {out / 'matrix.json'}, .md and .png")
    return 0
