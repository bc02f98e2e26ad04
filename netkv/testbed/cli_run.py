"""``netkv testbed run``: a trace slice replayed once per policy through ``netkv proxy``
under the same background schedule, on a running testbed (``--run ID``) or a fresh one."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from netkv.signals import watch_interrupt
from netkv.testbed.background import HotSpot, Schedule, core_schedule
from netkv.testbed.cli_lab import (
    bytes_per_token,
    policy_list,
    replay_requests,
    start,
    topology_of,
    trace_source,
)
from netkv.testbed.controlplane import ControlPlane
from netkv.testbed.engines import EngineModel
from netkv.testbed.fabric import FabricPlan
from netkv.testbed.netns import Lab, inside
from netkv.testbed.runner import (
    MapEndpoints,
    ReplaySpec,
    format_table,
    run_policies,
    write_summary,
)
from netkv.yamlfile import read_yaml


def policy_replay(args: argparse.Namespace) -> int:
    spec = ReplaySpec(start=args.start, count=args.count, speedup=args.speedup)
    requests = replay_requests(args, spec)
    policies = policy_list(args.policies)
    if args.run:
        lab = Lab.resume(args.run)
        extra = lab.ledger.extra
        args.topology, args.scale = extra.get("topology"), float(str(extra["scale"]))
        topology, _ = topology_of(args)
        plan = FabricPlan.of(topology, lab.prefix, args.scale)
        control = ControlPlane(lab, plan, Path(str(extra["workdir"])),
                               bytes_per_token=bytes_per_token(args.scale))
        control.adopt_scheduler(int(str(extra.get("scheduler_pid", 0))))
        owned = False
    else:
        lab = Lab()
        owned = True
    try:
        if owned:
            plan, control = start(lab, args)
        schedule = _schedule(args, plan, requests[-1].arrival_s + spec.warmup_s + 10.0)
        model = replace(EngineModel(), bytes_per_token=float(bytes_per_token(args.scale)))
        with inside(plan.control_ns):
            results = asyncio.run(_replay(plan, control, model=model, schedule=schedule,
                                          spec=spec, requests=requests, policies=policies))
        if not owned:
            lab.ledger.extra["scheduler_pid"] = control.scheduler.pid if control.scheduler \
                else 0
            lab.ledger.save()
    finally:
        if owned:
            lab.teardown()
        else:
            lab.detach()
    print(format_table(results))
    meta = {"scale": args.scale, "kv_bytes_per_token": bytes_per_token(args.scale),
            "trace": trace_source(args) or "embedded", "start": args.start, "count": len(requests),
            "speedup": args.speedup, "schedule": [_spot(h) for h in schedule.hot_spots],
            "scale_note": plan.describe_scale()}
    path = write_summary(Path(args.out), results, meta)
    print(f"wrote {path}")
    return 0


def _spot(h: HotSpot) -> dict[str, Any]:
    return {"link": h.link, "start_s": h.start_s, "end_s": h.end_s, "flows": h.flows}


def _schedule(args: argparse.Namespace, plan: FabricPlan, duration_s: float) -> Schedule:
    if not args.schedule:
        return core_schedule(plan, duration_s, args.flows)
    return Schedule.parse(read_yaml(args.schedule, "schedule"), args.schedule)


async def _replay(plan: FabricPlan, control: ControlPlane, *, model: EngineModel,
                  schedule: Schedule, spec: ReplaySpec, requests: list[Any],
                  policies: list[str]) -> Any:
    # through `netkv proxy`, which follows the control plane's map as the scheduler does;
    # a Ctrl-C whose KeyboardInterrupt was lost still ends the replay (watch_interrupt)
    watch = asyncio.ensure_future(watch_interrupt())
    try:
        return await run_policies(plan, model, schedule=schedule, spec=spec,
                                  requests=requests, policies=policies,
                                  endpoints=MapEndpoints.from_config(control.shared_config()))
    finally:
        watch.cancel()
