"""Bringing the namespace testbed up, and the inputs every ``netkv testbed`` action shares:
the topology, the KV bytes per token at the run's scale, the trace and the policy names."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from netkv.adapters.topology_file import load_topology
from netkv.core.policies import policy_names
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError
from netkv.testbed.controlplane import ControlPlane, Tuning
from netkv.testbed.engines import EngineModel
from netkv.testbed.fabric import FabricPlan, build
from netkv.testbed.netns import Lab, inside
from netkv.testbed.runner import ReplaySpec, load_requests
from netkv.testbed.workload import synthetic_requests

DEFAULT_TOPOLOGY: dict[str, Any] = {
    "fabric": {"nic_gbps": 400, "leaf_oversubscription": 1, "pod_oversubscription": 2},
    "fat_tree": {"pods": 2, "leaves_per_pod": 2, "hosts_per_leaf": 2, "gpus_per_host": 8,
                 "instance_gpus": 8, "role_pattern": "PD"},
}
WORK_ROOT = Path("/tmp/netkv-testbed")


def topology_of(args: argparse.Namespace) -> tuple[Topology, str | None]:
    if args.topology:
        return load_topology(args.topology), str(Path(args.topology).resolve())
    return parse_topology(DEFAULT_TOPOLOGY, "default testbed topology"), None


def bytes_per_token(scale: float) -> int:
    return max(1, round(EngineModel().bytes_per_token * scale))


def start(lab: Lab, args: argparse.Namespace, tuning: Tuning | None = None
           ) -> tuple[FabricPlan, ControlPlane]:
    topology, source = topology_of(args)
    plan = FabricPlan.of(topology, lab.prefix, args.scale)
    print(plan.describe_scale(), flush=True)
    lab.ledger.extra.update({"topology": source, "scale": args.scale,
                             "workdir": str(WORK_ROOT / lab.run)})
    lab.ledger.save()
    t0 = time.monotonic()
    build(lab, plan)
    control = ControlPlane(lab, plan, WORK_ROOT / lab.run,
                           bytes_per_token=bytes_per_token(args.scale),
                           agents=not args.no_agents, tuning=tuning)
    with inside(plan.control_ns):
        asyncio.run(control.start())
    lab.ledger.extra["scheduler_pid"] = control.scheduler.pid if control.scheduler else 0
    lab.ledger.save()
    print(f"testbed {lab.run}: {len(plan.namespaces)} namespaces, "
          f"{len(control.agents)} agents, up in {time.monotonic() - t0:.1f}s; "
          f"logs in {control.workdir / 'logs'}", flush=True)
    return plan, control


def up(args: argparse.Namespace) -> int:
    lab = Lab()
    try:
        start(lab, args)
    except BaseException:
        lab.teardown()
        raise
    lab.detach()
    print(f"run `netkv testbed run --run {lab.run}` to replay, "
          f"`netkv testbed down --run {lab.run}` to remove it")
    return 0


def trace_source(args: argparse.Namespace) -> str | None:
    """The trace named by --trace or $NETKV_TRACE; None: the embedded seeded workload."""
    given: str | None = args.trace or args.environ.get("NETKV_TRACE")
    return given or None


def replay_requests(args: argparse.Namespace, spec: ReplaySpec) -> list[Any]:
    """The replay's requests: the named trace (an error if it cannot be read), otherwise the
    embedded seeded workload."""
    given = trace_source(args)
    return load_requests(Path(given), spec) if given else synthetic_requests(spec)


def policy_list(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise InputError("--policies", "name at least one policy")
    unknown = [n for n in names if n not in policy_names()]
    if unknown:
        raise InputError("--policies", f"unknown policy {unknown[0]!r}; known: "
                         f"{', '.join(policy_names())}")
    return names
