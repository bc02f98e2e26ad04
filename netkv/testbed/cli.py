"""``netkv testbed up | run | down``: the emulated fat-tree in network namespaces.

* ``up`` builds the fabric and starts the mesh (Redis, Mosquitto, oracle, scheduler, agents),
  prints the run id and the scale, and leaves it running.
* ``run --policies cache_load,netkv --out DIR`` replays a trace slice once per policy under
  the same background schedule on the running testbed (``--run ID``) or on a fresh one that it
  tears down afterwards; prints the table and writes ``DIR/summary.json``.
* ``down`` removes a run (``--run ID``) or every testbed run's namespaces and processes.

The compose testbed uses two more actions: ``engine --host NAME`` (one GPU host's emulated
engines as a service) and ``workload`` (the one-shot policy comparison against them).

Needs root (namespaces, tc). Teardown also happens on errors and Ctrl-C; ``down`` cleans up
after a ``kill -9``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from netkv.adapters.topology_file import load_topology
from netkv.config import read_config_file
from netkv.core.policies import policy_names
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError
from netkv.logs import configure_logging
from netkv.testbed.background import HotSpot, Schedule, bulk, core_schedule
from netkv.testbed.compare import EngineApi, RouterComparison
from netkv.testbed.controlplane import ControlPlane, Tuning
from netkv.testbed.enginehost import EngineHostSettings, run_forever
from netkv.testbed.engines import EngineModel
from netkv.testbed.fabric import DEFAULT_SCALE, FabricPlan, build
from netkv.testbed.faults import PRESETS as FAULT_PRESETS
from netkv.testbed.faults import FaultSchedule
from netkv.testbed.faults import preset as fault_preset
from netkv.testbed.netns import Lab, LabError, inside, sweep
from netkv.testbed.routerrun import RouterRun, format_comparison, write_comparison
from netkv.testbed.routers import Pinning, RouterError, executable, parse_routers
from netkv.testbed.runner import (
    MapEndpoints,
    ReplaySpec,
    format_table,
    load_requests,
    run_policies,
    write_summary,
)
from netkv.testbed.workload import replay, requests_for, synthetic_requests

DEFAULT_TOPOLOGY: dict[str, Any] = {
    "fabric": {"nic_gbps": 400, "leaf_oversubscription": 1, "pod_oversubscription": 2},
    "fat_tree": {"pods": 2, "leaves_per_pod": 2, "hosts_per_leaf": 2, "gpus_per_host": 8,
                 "instance_gpus": 8, "role_pattern": "PD"},
}
WORK_ROOT = Path("/tmp/netkv-testbed")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action",
                        choices=("up", "run", "down", "engine", "workload", "bulk"))
    parser.add_argument("--topology", help="topology file (default: 2 pods x 2 leaves x 2 "
                        "hosts; prefill and decode hosts alternate, one 8-GPU instance each, "
                        "so every KV transfer crosses the network)")
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                        help=f"link-rate and KV-byte scale (default {DEFAULT_SCALE:g}: "
                        "400 Gb/s -> 40 Mb/s)")
    parser.add_argument("--run", help="run id of a testbed started with `up`")
    parser.add_argument("--policies", default="cache_load,netkv",
                        help="comma-separated policy names (default cache_load,netkv)")
    parser.add_argument("--out", default="results/testbed", help="output directory")
    parser.add_argument("--trace", help="trace file (default $NETKV_TRACE, else the "
                        "embedded seeded workload)")
    parser.add_argument("--start", type=int, default=0, help="first trace request")
    parser.add_argument("--count", type=int, default=50, help="requests per policy")
    parser.add_argument("--speedup", type=float, default=1.0, help="trace time compression")
    parser.add_argument("--schedule", help="background schedule file (default: core links "
                        "congested throughout, plus a leaf hot spot that moves)")
    parser.add_argument("--flows", type=int, default=12, help="flows per default hot spot")
    parser.add_argument("--no-agents", action="store_true",
                        help="skip the agents (the scheduler then uses tier priors only)")
    peers = parser.add_argument_group("router comparison (run --routers)")
    peers.add_argument("--routers", help="replay through each router in turn, e.g. "
                       "netkv,cache_load,vllm-router:round_robin,vllm-router:cache_aware "
                       "(NetKV policies run in `netkv proxy`; peers need netkv[peers])")
    peers.add_argument("--faults", default="quiet",
                       help="fault schedule for --routers: quiet, degraded-nic, failed-rail, "
                       "moving-hot-spot, or a schedule file (default quiet)")
    peers.add_argument("--fault-host", help="the host the degraded-nic / failed-rail "
                       "presets act on (default: the first decode host)")
    peers.add_argument("--router-cpus", default=None,
                       help="CPUs every router is pinned to (taskset list; default: the "
                       "last CPU)")
    peers.add_argument("--router-nice", type=int, default=0, help="nice of every router")
    compose = parser.add_argument_group("compose testbed (engine, workload)")
    compose.add_argument("--host", help="engine: the topology host this container is")
    compose.add_argument("--scheduler", default="http://127.0.0.1:8090",
                         help="scheduler base URL")
    compose.add_argument("--http-port", type=int, default=9000, help="engine HTTP port")
    compose.add_argument("--kv-port", type=int, default=9100, help="first KV stream port")
    compose.add_argument("--engine-url", default="http://{host}:9000",
                         help="workload: engine URL template")
    compose.add_argument("--config", help="workload: shared config (redis, mqtt) whose map "
                         "the proxy follows")
    compose.add_argument("--listen", help="bulk: sink address HOST:PORT")
    compose.add_argument("--to", help="bulk: send to HOST:PORT")
    compose.add_argument("--seconds", type=float, default=600.0, help="bulk: how long")


def _topology(args: argparse.Namespace) -> tuple[Topology, str | None]:
    if args.topology:
        return load_topology(args.topology), str(Path(args.topology).resolve())
    return parse_topology(DEFAULT_TOPOLOGY, "default testbed topology"), None


def _check(args: argparse.Namespace) -> None:
    if not 0 < args.scale <= 1:
        raise InputError("--scale", f"must be in (0, 1], got {args.scale}")
    if args.count < 1:
        raise InputError("--count", "must be >= 1")
    if args.speedup <= 0:
        raise InputError("--speedup", "must be > 0")


def _bytes_per_token(scale: float) -> int:
    return max(1, round(EngineModel().bytes_per_token * scale))


def _raise_on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    configure_logging()
    _check(args)
    signal.signal(signal.SIGTERM, _raise_on_term)  # teardown on `kill` as on Ctrl-C
    if args.action == "down":
        removed = sweep(run=args.run)
        print(f"netkv testbed down: removed {len(removed)} namespaces"
              + (f" of run {args.run}" if args.run else ""))
        return 0
    if args.action == "engine":
        return _engine(args)
    if args.action == "workload":
        return _workload(args)
    if args.action == "bulk":
        return _bulk(args)
    try:
        if args.action == "up":
            return _up(args)
        if args.routers:
            return _compare(args)
        return _run(args)
    except (LabError, RouterError) as exc:
        print(f"netkv testbed: {exc}", file=sys.stderr)
        return 1


def _start(lab: Lab, args: argparse.Namespace, tuning: Tuning | None = None
           ) -> tuple[FabricPlan, ControlPlane]:
    topology, source = _topology(args)
    plan = FabricPlan.of(topology, lab.prefix, args.scale)
    print(plan.describe_scale(), flush=True)
    lab.ledger.extra.update({"topology": source, "scale": args.scale,
                             "workdir": str(WORK_ROOT / lab.run)})
    lab.ledger.save()
    t0 = time.monotonic()
    build(lab, plan)
    control = ControlPlane(lab, plan, WORK_ROOT / lab.run,
                           bytes_per_token=_bytes_per_token(args.scale),
                           agents=not args.no_agents, tuning=tuning)
    with inside(plan.control_ns):
        asyncio.run(control.start())
    lab.ledger.extra["scheduler_pid"] = control.scheduler.pid if control.scheduler else 0
    lab.ledger.save()
    print(f"testbed {lab.run}: {len(plan.namespaces)} namespaces, "
          f"{len(control.agents)} agents, up in {time.monotonic() - t0:.1f}s; "
          f"logs in {control.workdir / 'logs'}", flush=True)
    return plan, control


def _up(args: argparse.Namespace) -> int:
    lab = Lab()
    try:
        _start(lab, args)
    except BaseException:
        lab.teardown()
        raise
    lab.detach()
    print(f"run `netkv testbed run --run {lab.run}` to replay, "
          f"`netkv testbed down --run {lab.run}` to remove it")
    return 0


def _fault_schedule(args: argparse.Namespace, plan: FabricPlan,
                    duration_s: float) -> FaultSchedule:
    if args.faults in FAULT_PRESETS:
        return fault_preset(args.faults, plan, duration_s, host=args.fault_host,
                            flows=args.flows)
    try:
        data = yaml.safe_load(Path(args.faults).read_text())
    except (OSError, yaml.YAMLError) as exc:
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


def _trace_source(args: argparse.Namespace) -> str | None:
    """The trace named by --trace or $NETKV_TRACE; None: the embedded seeded workload."""
    given: str | None = args.trace or args.environ.get("NETKV_TRACE")
    return given or None


def _requests(args: argparse.Namespace, spec: ReplaySpec) -> list[Any]:
    """The replay's requests: the named trace (an error if it cannot be read), otherwise the
    embedded seeded workload."""
    given = _trace_source(args)
    return load_requests(Path(given), spec) if given else synthetic_requests(spec)


def _compare(args: argparse.Namespace) -> int:
    """``run --routers``: the same replay through each router in turn on a fresh testbed,
    the agents at their default cadences."""
    specs = parse_routers(args.routers)
    pinning = _pinning(args)
    if args.run:
        raise InputError("--run", "the router comparison builds its own testbed")
    spec = ReplaySpec(start=args.start, count=args.count, speedup=args.speedup)
    requests = _requests(args, spec)
    for s in specs:  # a missing peer binary fails now, not after the fabric is built
        if s.kind != "netkv":
            executable(s.kind)
    EngineApi()  # likewise the vLLM-protocol engines
    lab = Lab()
    try:
        plan, control = _start(lab, args, Tuning.agent_defaults())
        span = requests[-1].arrival_s + spec.warmup_s + 2.0
        schedule = _fault_schedule(args, plan, span)
        model = replace(EngineModel(), bytes_per_token=float(_bytes_per_token(args.scale)))

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
    meta = {"scale": args.scale, "kv_bytes_per_token": _bytes_per_token(args.scale),
            "trace": _trace_source(args) or "embedded", "start": args.start, "count": len(requests),
            "speedup": args.speedup, "faults": args.faults, "schedule": schedule.describe(),
            "router_cpus": list(pinning.cpus), "router_nice": pinning.nice,
            "scale_note": plan.describe_scale()}
    path = write_comparison(Path(args.out), runs, meta)
    print(f"wrote {path}")
    return 0


def _run(args: argparse.Namespace) -> int:
    spec = ReplaySpec(start=args.start, count=args.count, speedup=args.speedup)
    requests = _requests(args, spec)
    policies = _policies(args.policies)
    if args.run:
        lab = Lab.resume(args.run)
        extra = lab.ledger.extra
        args.topology, args.scale = extra.get("topology"), float(str(extra["scale"]))
        topology, _ = _topology(args)
        plan = FabricPlan.of(topology, lab.prefix, args.scale)
        control = ControlPlane(lab, plan, Path(str(extra["workdir"])),
                               bytes_per_token=_bytes_per_token(args.scale))
        control.adopt_scheduler(int(str(extra.get("scheduler_pid", 0))))
        owned = False
    else:
        lab = Lab()
        owned = True
    try:
        if owned:
            plan, control = _start(lab, args)
        schedule = _schedule(args, plan, requests[-1].arrival_s + spec.warmup_s + 10.0)
        model = replace(EngineModel(), bytes_per_token=float(_bytes_per_token(args.scale)))
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
    meta = {"scale": args.scale, "kv_bytes_per_token": _bytes_per_token(args.scale),
            "trace": _trace_source(args) or "embedded", "start": args.start, "count": len(requests),
            "speedup": args.speedup, "schedule": [_spot(h) for h in schedule.hot_spots],
            "scale_note": plan.describe_scale()}
    path = write_summary(Path(args.out), results, meta)
    print(f"wrote {path}")
    return 0


def _engine(args: argparse.Namespace) -> int:
    if not args.host or not args.topology:
        raise InputError("--host", "engine needs --host and --topology")
    topology, _ = _topology(args)
    topology.host_id(args.host)
    settings = EngineHostSettings(host=args.host, http_port=args.http_port,
                                  kv_port=args.kv_port,
                                  bytes_per_token=float(_bytes_per_token(args.scale)))
    return run_forever(settings, topology)


def _address(value: str | None, flag: str) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(flag, f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _bulk(args: argparse.Namespace) -> int:
    listen, to = _address(args.listen, "--listen"), _address(args.to, "--to")
    if listen is None and to is None:
        raise InputError("--listen", "bulk needs --listen and/or --to")
    if not 0 < args.seconds <= 86400 or not 1 <= args.flows <= 256:
        raise InputError("--seconds", "seconds in (0, 86400] and flows in 1..256")
    print(f"bulk: sink {listen}, {args.flows if to else 0} flows to {to} for {args.seconds:g}s",
          flush=True)
    sent = asyncio.run(bulk(listen, to, args.flows, args.seconds))
    print(f"bulk: sent {sent} bytes", flush=True)
    return 0


def _workload(args: argparse.Namespace) -> int:
    if not args.topology:
        raise InputError("--topology", "workload needs the compose topology file")
    topology, _ = _topology(args)
    trace_arg = args.trace or args.environ.get("NETKV_TRACE")
    spec = ReplaySpec(start=args.start, count=args.count, speedup=args.speedup)
    requests, source = requests_for(Path(trace_arg) if trace_arg else None, spec)
    policies = _policies(args.policies)
    print(f"workload: {len(requests)} requests from {source}, policies {policies}",
          flush=True)
    shared = read_config_file(args.config) if args.config else {}
    results = asyncio.run(replay(topology, args.engine_url, requests, policies,
                                 endpoints=MapEndpoints.from_config(shared),
                                 bytes_per_token=float(_bytes_per_token(args.scale))))
    print(format_table(results), flush=True)
    path = write_summary(Path(args.out), results, {
        "testbed": "compose", "requests": len(requests), "source": source,
        "scale": args.scale, "kv_bytes_per_token": _bytes_per_token(args.scale)})
    print(f"wrote {path}", flush=True)
    failed = sum(r.summary()["errors"] for r in results.values())
    return 1 if failed == sum(len(r.outcomes) for r in results.values()) else 0


def _policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise InputError("--policies", "name at least one policy")
    unknown = [n for n in names if n not in policy_names()]
    if unknown:
        raise InputError("--policies", f"unknown policy {unknown[0]!r}; known: "
                         f"{', '.join(policy_names())}")
    return names


def _spot(h: HotSpot) -> dict[str, Any]:
    return {"link": h.link, "start_s": h.start_s, "end_s": h.end_s, "flows": h.flows}


def _schedule(args: argparse.Namespace, plan: FabricPlan, duration_s: float) -> Schedule:
    if not args.schedule:
        return core_schedule(plan, duration_s, args.flows)
    try:
        data = yaml.safe_load(Path(args.schedule).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(args.schedule, f"cannot read schedule: {exc}") from None
    return Schedule.parse(data, args.schedule)


async def _replay(plan: FabricPlan, control: ControlPlane, *, model: EngineModel,
                  schedule: Schedule, spec: ReplaySpec, requests: list[Any],
                  policies: list[str]) -> Any:
    # through `netkv proxy`, which follows the control plane's map as the scheduler does
    return await run_policies(plan, model, schedule=schedule, spec=spec, requests=requests,
                              policies=policies,
                              endpoints=MapEndpoints.from_config(control.shared_config()))
