"""``netkv sim``: simulate decode-selection policies on a Mooncake trace.

    netkv sim --trace PATH --scenario fat-tree-64 --policies a,b,c --out DIR
    netkv sim matrix --trace PATH [--scenarios a,b] [--seeds 5] --out DIR
    netkv sim ... --sweep {length,load,staleness,congestion} [--values 0.5,1,2]
    netkv sim ... --tune

A policy is a registered name, optionally ``@truth`` to give it the ground-truth oracle
instead of the telemetry view (``netkv@truth`` is the physical limit of ``netkv``) or
``@static`` for the per-tier nominal-share table (no measurement). ``matrix`` runs every
scenario, policy and seed with tuned baselines and 95% CIs (see :mod:`netkv.sim.matrix`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from netkv.core.policies import make_policy
from netkv.errors import InputError
from netkv.sim import matrix, matrix_combine
from netkv.sim.report import cdf_plot, comparisons, summarise, table, write_json
from netkv.sim.runs import USAGE, default_jobs, run_all
from netkv.sim.scenario import load_scenario
from netkv.sim.simulation import OracleKind, RunConfig, Simulation
from netkv.sim.sweep import SWEEPS, sweep, sweep_table, tune, tune_table
from netkv.workload.trace import load_trace

DEFAULT_POLICIES = ("round_robin,least_loaded,cache_load,llmd_weighted,netkv,netkv_pair,"
                    "netkv@truth")
SWEEP_POLICIES = "round_robin,cache_load,llmd_weighted,netkv,netkv@truth"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("run", "matrix"), default="run",
                        help="run (default): one scenario; matrix: every scenario x policy x "
                        "seed with confidence intervals")
    parser.add_argument("--trace", required=True, help="Mooncake-format JSONL trace")
    parser.add_argument("--scenario", default="fat-tree-64",
                        help="scenario name (netkv/sim/scenarios/NAME.yaml) or a YAML path")
    parser.add_argument("--policies", default=None,
                        help=f"comma-separated policies (default: {DEFAULT_POLICIES}; "
                        f"sweeps: {SWEEP_POLICIES})")
    parser.add_argument("--out", default="results/sim", help="output directory")
    parser.add_argument("--rate-scale", type=float, default=None,
                        help="multiply the arrival rate (load); default from the scenario")
    parser.add_argument("--length-scale", type=float, default=None,
                        help="multiply prompt lengths (context); default from the scenario")
    parser.add_argument("--telemetry-interval", type=float, default=None,
                        help="seconds between telemetry samples")
    parser.add_argument("--telemetry-delay", type=float, default=None,
                        help="seconds from sample to visibility")
    parser.add_argument("--telemetry-noise", type=float, default=None,
                        help="log-normal sigma of per-link measurement error")
    parser.add_argument("--congestion", type=float, default=1.0,
                        help="multiplier on background hot-spot intensity")
    parser.add_argument("--limit", type=int, default=None, help="only the first N requests")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes (default: every core this process may use)")
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default=None,
                        help="sweep one knob instead of a single comparison")
    parser.add_argument("--values", default=None, help="comma-separated sweep values")
    parser.add_argument("--tune", action="store_true",
                        help="grid-search the baselines' weights and report the best")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    matrix.configure(parser)


def parse_policies(text: str) -> list[RunConfig]:
    configs: list[RunConfig] = []
    for i, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            raise InputError(f"--policies[{i}]", "empty policy name")
        name, _, oracle = item.partition("@")
        make_policy(name)  # validates the name now, before any work
        if oracle not in ("", "telemetry", "truth", "static"):
            raise InputError(f"--policies[{i}]",
                             f"unknown oracle {oracle!r} in {item!r}; known: telemetry, truth, "
                             "static")
        kind: OracleKind = ("truth" if oracle == "truth" else
                            "static" if oracle == "static" else "telemetry")
        configs.append(RunConfig(name, oracle=kind, label=item))
    if len({c.name for c in configs}) != len(configs):
        raise InputError("--policies", "a policy is listed twice")
    return configs


def _positive(value: float | None, flag: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not value >= 0 or (value == 0 and not allow_zero) or value == float("inf"):
        raise InputError(flag, f"must be a positive finite number, got {value}")


def run(args: argparse.Namespace) -> int:
    for flag, value, zero in (("--rate-scale", args.rate_scale, False),
                              ("--length-scale", args.length_scale, False),
                              ("--telemetry-interval", args.telemetry_interval, False),
                              ("--telemetry-delay", args.telemetry_delay, True),
                              ("--telemetry-noise", args.telemetry_noise, True),
                              ("--congestion", args.congestion, True)):
        _positive(value, flag, zero)
    if args.limit is not None and args.limit < 1:
        raise InputError("--limit", f"must be >= 1, got {args.limit}")
    if args.jobs is None:
        args.jobs = default_jobs()
    if args.jobs < 1:
        raise InputError("--jobs", f"must be >= 1, got {args.jobs}")
    if args.action == "matrix":
        return matrix_combine.run_combine(args) if args.combine else matrix.run(args)
    scenario = load_scenario(args.scenario)
    spec = scenario.spec
    rate = args.rate_scale if args.rate_scale is not None else spec.rate_scale
    length = args.length_scale if args.length_scale is not None else spec.length_scale
    configs = parse_policies(args.policies or (SWEEP_POLICIES if args.sweep
                                               else DEFAULT_POLICIES))
    overrides: dict[str, Any] = {"congestion": args.congestion,
                                 "telemetry_interval_s": args.telemetry_interval,
                                 "telemetry_delay_s": args.telemetry_delay,
                                 "telemetry_noise": args.telemetry_noise}
    configs = [RunConfig(c.policy, c.params, c.oracle, c.label, **overrides) for c in configs]
    trace = load_trace(args.trace, limit=args.limit)
    out = Path(args.out)
    progress = not args.no_progress
    if args.tune:
        report = tune(scenario, trace.scaled(rate, length), out, args.jobs)
        print(tune_table(report))
        return 0
    if args.sweep:
        values = None
        if args.values:
            try:
                values = [float(v) for v in args.values.split(",") if v.strip()]
            except ValueError:
                raise InputError("--values", f"expected numbers, got {args.values!r}") from None
            for v in values:
                _positive(v, "--values", allow_zero=args.sweep == "congestion")
        data = sweep(args.sweep, scenario, trace, configs, values=values, out=out, jobs=args.jobs,
                     rate_scale=rate, length_scale=length)
        print(sweep_table(data))
        print(f"wrote {out / ('sweep_' + args.sweep + '.json')} and .png")
        return 0
    wall = time.perf_counter()
    cpu = USAGE.cpu_s
    sim = Simulation(scenario, trace.scaled(rate, length))
    results = run_all({"base": sim}, [("base", c) for c in configs], args.jobs, progress)
    wall = time.perf_counter() - wall
    cpu = USAGE.cpu_s - cpu
    rows = {r.name: summarise(r, spec.slo.tbt_s) for r in results}
    summary = {
        "scenario": spec.name,
        "trace": str(args.trace),
        "requests": len(trace),
        "rate_scale": rate,
        "length_scale": length,
        "slo": {"ttft_scale": spec.slo.ttft_scale, "ttft_floor_s": spec.slo.ttft_floor_s,
                "tbt_s": spec.slo.tbt_s},
        "wall_s": wall,
        "cpu_s": cpu,
        "jobs": args.jobs,
        "policies": rows,
        "netkv_vs": comparisons(rows, "netkv"),
    }
    write_json(out / "summary.json", summary)
    cdf_plot(out / "ttft_cdf.png", results,
             f"{spec.name}: TTFT CDF, {len(trace)} requests (rate x{rate:g}, length x{length:g})")
    print(table(rows))
    print(f"{len(trace)} requests x {len(configs)} policies in {wall:.1f} s wall, "
          f"{cpu:.1f} s CPU ({cpu / max(len(configs), 1):.1f} s per policy; {args.jobs} jobs; "
          f"load average {os.getloadavg()[0]:.1f}); wrote {out / 'summary.json'} and "
          f"{out / 'ttft_cdf.png'}")
    return 0
