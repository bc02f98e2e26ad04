"""``netkv testbed run --routers``: the same replay through each router in turn, on a fresh
testbed, under a fault schedule (see :mod:`netkv.testbed.compare`)."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
from dataclasses import replace
from pathlib import Path

from netkv.errors import InputError
from netkv.testbed.cli_lab import bytes_per_token, replay_requests, start, trace_source
from netkv.testbed.compare import EngineApi, RouterComparison
from netkv.testbed.controlplane import Tuning
from netkv.testbed.engines import EngineModel
from netkv.testbed.fabric import FabricPlan
from netkv.testbed.faults import PRESETS as FAULT_PRESETS
from netkv.testbed.faults import FaultSchedule
from netkv.testbed.faults import preset as fault_preset
from netkv.testbed.netns import Lab, inside
from netkv.testbed.routerrun import RouterRun, format_comparison, write_comparison
from netkv.testbed.routers import Pinning, executable, parse_routers
from netkv.testbed.runner import ReplaySpec
from netkv.yamlfile import read_yaml


def compare(args: argparse.Namespace) -> int:
    """``run --routers``: the same replay through each router in turn on a fresh testbed,
    the agents at their default cadences."""
    specs = parse_routers(args.routers)
    pinning = _pinning(args)
    if args.run:
        raise InputError("--run", "the router comparison builds its own testbed")
    spec = ReplaySpec(start=args.start, count=args.count, speedup=args.speedup)
    requests = replay_requests(args, spec)
    for s in specs:  # a missing peer binary fails now, not after the fabric is built
        if s.kind != "netkv":
            executable(s.kind)
    EngineApi()  # likewise the vLLM-protocol engines
    lab = Lab()
    try:
        plan, control = start(lab, args, Tuning.agent_defaults())
        span = requests[-1].arrival_s + spec.warmup_s + 2.0
        schedule = _fault_schedule(args, plan, span)
        model = replace(EngineModel(), bytes_per_token=float(bytes_per_token(args.scale)))

        def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
            return lab.spawn(plan.control_ns, argv, log_path)

        async def replay_all() -> dict[str, RouterRun]:
            comparison = RouterComparison(plan, model, schedule, spec, spawn=spawn,
                                          workdir=control.workdir,
                                          shared_config=control.shared_config(),
                                          pinning=pinning, oracle_url=control.oracle_url)
            runs: dict[str, RouterRun] = {}
            for s in specs:
                print(f"replaying through {s.label} ({len(requests)} requests, faults "
                      f"{args.faults})", flush=True)
                runs[s.label] = await comparison.run(s, requests)
            return runs

        with inside(plan.control_ns):
            runs = asyncio.run(replay_all())
    finally:
        lab.teardown()
    print(format_comparison(runs))
    meta = {"scale": args.scale, "kv_bytes_per_token": bytes_per_token(args.scale),
            "trace": trace_source(args) or "embedded", "start": args.start, "count": len(requests),
            "speedup": args.speedup, "faults": args.faults, "schedule": schedule.describe(),
            "router_cpus": list(pinning.cpus), "router_nice": pinning.nice,
            "scale_note": plan.describe_scale()}
    path = write_comparison(Path(args.out), runs, meta)
    print(f"wrote {path}")
    return 0


def _fault_schedule(args: argparse.Namespace, plan: FabricPlan,
                    duration_s: float) -> FaultSchedule:
    if args.faults in FAULT_PRESETS:
        return fault_preset(args.faults, plan, duration_s, host=args.fault_host,
                            flows=args.flows)
    try:
        data = read_yaml(args.faults, "fault schedule")
    except InputError as exc:
        raise InputError("--faults", f"not a preset ({', '.join(FAULT_PRESETS)}) and not a "
                         f"readable schedule file: {exc}") from None
    schedule = FaultSchedule.parse(data, args.faults)
    schedule.check(plan)
    return schedule


def _pinning(args: argparse.Namespace) -> Pinning:
    if args.router_cpus is None:
        return Pinning(nice=args.router_nice)
    try:
        cpus = tuple(int(c) for c in str(args.router_cpus).split(",") if c.strip())
    except ValueError:
        raise InputError("--router-cpus", f"expected CPU numbers such as 1 or 0,1, got "
                         f"{args.router_cpus!r}") from None
    return Pinning(cpus=cpus, nice=args.router_nice)
