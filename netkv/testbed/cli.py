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

This module holds the flags and the dispatch; the actions live beside it by concept:
:mod:`~netkv.testbed.cli_lab` (``up``, and the topology, trace and policy inputs every action
shares), :mod:`~netkv.testbed.cli_run` (``run``), :mod:`~netkv.testbed.cli_compare` (``run
--routers``) and :mod:`~netkv.testbed.cli_compose` (``engine``, ``workload``, ``bulk``).
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from netkv.errors import InputError
from netkv.logs import configure_logging
from netkv.signals import INTERRUPTED
from netkv.testbed.cli_compare import compare
from netkv.testbed.cli_compose import bulk_flows, engine, workload
from netkv.testbed.cli_lab import up
from netkv.testbed.cli_run import policy_replay
from netkv.testbed.fabric import DEFAULT_SCALE
from netkv.testbed.netns import LabError, sweep
from netkv.testbed.routers import RouterError


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


def _check(args: argparse.Namespace) -> None:
    if not 0 < args.scale <= 1:
        raise InputError("--scale", f"must be in (0, 1], got {args.scale}")
    if args.count < 1:
        raise InputError("--count", "must be >= 1")
    if args.speedup <= 0:
        raise InputError("--speedup", "must be > 0")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    INTERRUPTED.signal = signum
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    configure_logging()
    _check(args)
    # Ctrl-C and `kill` both raise KeyboardInterrupt where the main thread is. With Python's own
    # SIGINT handler, asyncio.run would instead cancel its main task, and a cancellation that
    # some awaited library swallows lets the run carry on to the end (seen under load: exit 0
    # instead of 130). A raise is harder to lose (asyncio.run still cancels and awaits every
    # task on its way out, so the teardown runs as before); where it is lost all the same (inside a
    # library's import), the recorded signal ends the run (netkv.signals.INTERRUPTED).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.action == "down":
        removed = sweep(run=args.run)
        print(f"netkv testbed down: removed {len(removed)} namespaces"
              + (f" of run {args.run}" if args.run else ""))
        return 0
    if args.action == "engine":
        return engine(args)
    if args.action == "workload":
        return workload(args)
    if args.action == "bulk":
        return bulk_flows(args)
    try:
        if args.action == "up":
            return up(args)
        code = compare(args) if args.routers else policy_replay(args)
    except (LabError, RouterError) as exc:
        print(f"netkv testbed: {exc}", file=sys.stderr)
        return 1
    if INTERRUPTED:  # the KeyboardInterrupt was lost on its way up (see INTERRUPTED)
        raise KeyboardInterrupt
    return code
