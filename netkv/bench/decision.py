"""`netkv bench decision`: in-process decision time per policy as |D| grows.

A 1,024-host fat-tree (8 pods x 8 leaves x 16 hosts, eight 1-GPU instances per host, half of
them decoders: 4,096 decode instances) with a random but fixed state: decoder loads, KV use,
prefix overlaps, a link-state oracle with congested links and 32 booked transfers. For each
|D| a random subset of decoders is the candidate set; each policy decides ``--iterations``
times through :class:`~netkv.core.policies.DecisionEngine` (so the figure includes the
engine's timing wrapper) and the p50/p99 are reported, both in wall-clock time and in the
thread's CPU time: on a shared machine the wall-clock p99 is mostly preemption by other
processes, the CPU time is what the decision itself costs. ``netkv_pair`` is timed with
``--prefill`` prefill candidates (it is O(|P| |D|)).

``--sim-trace PATH`` also runs ``netkv sim`` on that trace with every policy and records its
wall time (the "full trace in two minutes" figure).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from netkv.core.costmodel import LinkStateOracle
from netkv.core.policies import (
    CandidateView,
    DecisionEngine,
    PrefillView,
    RequestView,
    make_policy,
    policy_names,
)
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError
from netkv.sim.cli import DEFAULT_POLICIES, parse_policies
from netkv.sim.runs import run_all
from netkv.sim.scenario import load_scenario
from netkv.sim.simulation import Simulation
from netkv.workload.trace import load_trace

TARGETS_US = {16: 50.0, 4096: 500.0}  # netkv p99, from the issue


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="16,64,256,1024,4096",
                        help="candidate-set sizes |D| (max 4096)")
    parser.add_argument("--policies", default=",".join(policy_names()),
                        help="comma-separated policies")
    parser.add_argument("--iterations", type=int, default=2000, help="decisions per cell")
    parser.add_argument("--prefill", type=int, default=8,
                        help="prefill candidates for netkv_pair")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default="results/bench_decision.json", help="JSON output")
    parser.add_argument("--sim-trace", default=None,
                        help="also time `netkv sim` on this trace with every policy")
    parser.add_argument("--scenario", default="fat-tree-64", help="scenario for --sim-trace")
    parser.add_argument("--jobs", type=int, default=2, help="processes for --sim-trace")


def bench_topology() -> Topology:
    return parse_topology({
        "fabric": {"nic_gbps": 400, "leaf_oversubscription": 1, "pod_oversubscription": 3},
        "fat_tree": {"pods": 8, "leaves_per_pod": 8, "hosts_per_leaf": 16,
                     "gpus_per_host": 8, "instance_gpus": 1, "role_pattern": "PD"}})


def _state(topo: Topology, size: int, n_prefill: int, rng: np.random.Generator
           ) -> tuple[RequestView, RequestView, CandidateView, LinkStateOracle, DecisionEngine]:
    decoders = [i for i in topo.instances if i.role == "decode"]
    prefills = [i for i in topo.instances if i.role == "prefill"]
    pick = rng.choice(len(decoders), size=size, replace=False)
    hosts = np.array([topo.host_index[decoders[k].host] for k in pick], dtype=np.int64)
    cands = CandidateView(
        host=hosts,
        running=rng.integers(0, 32, size).astype(np.int64),
        waiting=rng.integers(0, 4, size).astype(np.int64),
        kv_use=rng.uniform(0.0, 0.95, size),
        capacity_tokens=np.full(size, 500_000.0),
        tbt_s=rng.uniform(0.015, 0.04, size),
        waiting_tokens=rng.uniform(0.0, 40_000.0, size),
    )
    avail = topo.capacity * rng.uniform(0.2, 1.0, topo.n_links)
    oracle = LinkStateOracle(topo, avail, topo.latency.copy())
    src = topo.host_index[prefills[int(rng.integers(len(prefills)))].host]
    overlap = rng.integers(0, 20, size).astype(np.int64)
    request = RequestView(prefill_host=src, prompt_tokens=12_000, kv_bytes_per_token=327680.0,
                          overlap_blocks=overlap, output_tokens=343)
    ppick = rng.choice(len(prefills), size=n_prefill, replace=False)
    pview = PrefillView(
        host=np.array([topo.host_index[prefills[k].host] for k in ppick], dtype=np.int64),
        ready_s=rng.uniform(0.1, 2.0, n_prefill))
    pair_request = RequestView(prefill_host=src, prompt_tokens=12_000,
                               kv_bytes_per_token=327680.0, overlap_blocks=overlap,
                               output_tokens=343, prefill=pview)
    engine = DecisionEngine(make_policy("netkv"), topo)
    for _ in range(32):
        a, b = rng.integers(topo.n_hosts, size=2)
        engine.reserve(int(a), int(b), float(rng.uniform(1e8, 4e9)))
    return request, pair_request, cands, oracle, engine


def measure(topo: Topology, policy: str, size: int, *, iterations: int, n_prefill: int,
            seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed + size)
    request, pair_request, cands, oracle, booked = _state(topo, size, n_prefill, rng)
    engine = DecisionEngine(make_policy(policy), topo, history=iterations,
                            bookings=booked.bookings)
    req = pair_request if policy == "netkv_pair" else request
    for _ in range(min(200, iterations)):
        engine.decide(req, cands, oracle)
    engine.count = 0
    cpu = np.empty(iterations)
    clock = time.thread_time_ns
    gc.collect()
    for i in range(iterations):
        start = clock()
        engine.decide(req, cands, oracle)
        cpu[i] = clock() - start
    wall = engine.recorded() * 1e6
    cpu *= 1e-3
    return {"p50_us": float(np.percentile(wall, 50)), "p99_us": float(np.percentile(wall, 99)),
            "mean_us": float(wall.mean()), "cpu_p50_us": float(np.percentile(cpu, 50)),
            "cpu_p99_us": float(np.percentile(cpu, 99)), "iterations": iterations}


def _sim_wall(trace: str, scenario: str, jobs: int) -> dict[str, Any]:
    start = time.perf_counter()
    sc = load_scenario(scenario)
    tr = load_trace(trace)
    configs = parse_policies(DEFAULT_POLICIES)
    sim = Simulation(sc, tr.scaled(sc.spec.rate_scale, sc.spec.length_scale))
    run_all({"base": sim}, [("base", c) for c in configs], jobs, show_progress=True)
    wall = time.perf_counter() - start
    return {"trace": trace, "scenario": scenario, "requests": len(tr),
            "policies": [c.name for c in configs], "jobs": jobs, "wall_s": wall,
            "within_2_minutes": wall <= 120.0}


def run(args: argparse.Namespace) -> int:
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise InputError("--sizes", f"expected integers, got {args.sizes!r}") from None
    if not sizes or any(s < 1 or s > 4096 for s in sizes):
        raise InputError("--sizes", "each size must be in 1..4096")
    if args.iterations < 10:
        raise InputError("--iterations", "must be >= 10")
    if not 1 <= args.prefill <= 4096:
        raise InputError("--prefill", "must be in 1..4096")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        make_policy(p)
    topo = bench_topology()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for policy in policies:
        results[policy] = {}
        for size in sizes:
            results[policy][str(size)] = measure(topo, policy, size,
                                                 iterations=args.iterations,
                                                 n_prefill=args.prefill, seed=args.seed)
    head = f"{'policy':<15}" + "".join(f"{'|D|=' + str(s):>16}" for s in sizes)
    lines: list[str] = []
    for title, p50, p99 in (("wall clock", "p50_us", "p99_us"),
                            ("thread CPU time (excludes preemption)", "cpu_p50_us",
                             "cpu_p99_us")):
        lines += [f"decision time p50 / p99 (microseconds), in process, {title}", head,
                  "-" * len(head)]
        for policy in policies:
            cells = "".join(f"{results[policy][str(s)][p50]:>8.1f}/"
                            f"{results[policy][str(s)][p99]:<7.1f}" for s in sizes)
            lines.append(f"{policy:<15}{cells}")
    targets: dict[str, Any] = {}
    if "netkv" in results:
        for size, limit in TARGETS_US.items():
            if str(size) in results["netkv"]:
                cell = results["netkv"][str(size)]
                targets[f"netkv_p99_at_{size}"] = {
                    "wall_p99_us": cell["p99_us"], "cpu_p99_us": cell["cpu_p99_us"],
                    "target_us": limit, "met_wall": cell["p99_us"] <= limit,
                    "met_cpu": cell["cpu_p99_us"] <= limit}
                lines.append(
                    f"target netkv p99 at |D|={size} <= {limit:.0f} us: wall "
                    f"{cell['p99_us']:.1f} us ({'met' if cell['p99_us'] <= limit else 'NOT met'})"
                    f", CPU {cell['cpu_p99_us']:.1f} us "
                    f"({'met' if cell['cpu_p99_us'] <= limit else 'NOT met'})")
    lines.append(f"load average during the run: {os.getloadavg()[0]:.2f} "
                 f"({os.cpu_count()} CPUs)")
    print("\n".join(lines))
    report: dict[str, Any] = {
        "benchmark": "decision", "python": platform.python_version(),
        "machine": platform.machine(), "iterations": args.iterations,
        "prefill_candidates_for_pair": args.prefill, "load_average": os.getloadavg()[0],
        "results": results, "targets": targets}
    if args.sim_trace:
        report["sim"] = _sim_wall(args.sim_trace, args.scenario, args.jobs)
        s = report["sim"]
        print(f"netkv sim on {s['requests']} requests x {len(s['policies'])} policies "
              f"({s['scenario']}, {s['jobs']} jobs): {s['wall_s']:.1f} s "
              f"({'within' if s['within_2_minutes'] else 'OVER'} 2 minutes)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0
