"""`netkv up`: the whole mesh on one machine, supervised, stopped cleanly with Ctrl-C.

Starts (or connects to, when URLs are given) ``redis-server`` and ``mosquitto`` on free loopback
ports, one agent per host of the topology on its own loopback address (127.0.0.x), an oracle
and a standby oracle, and the scheduler, each as a child process with its log in the work
directory (printed, and kept after exit). Fixed default ports (:data:`PORTS`); a port that is
taken stops `netkv up` before anything starts, with one line naming it.

A child counts as up when its own readiness check says ready (``/readyz``; an agent's
heartbeat). While the mesh runs, a :class:`~netkv.supervisor.Supervisor` watches every child:
a dead oracle is restarted (at most :data:`ORACLE_RESTARTS` times; the standby takes over the
map within the leader lease meanwhile); any other dead child is reported with its log tail and
`netkv up` stops everything and exits 1. Ctrl-C or SIGTERM stops the children in reverse order
of start, each with a bounded wait and then SIGKILL. Children also get SIGTERM from the kernel
if `netkv up` itself dies (``PR_SET_PDEATHSIG``).

Secrets: the scheduler's bearer token is generated (or taken from ``NETKV_TOKEN``) and written
to ``<workdir>/scheduler.token`` (mode 0600); a Redis password given in ``--redis-url`` goes
only into the 0600 config file; children get the config file's path, never a secret in argv,
and what is printed is redacted.

``--demo`` replays the workload twice through the scheduler (``cache_load``, then ``netkv``)
while a link of the emulated fabric is hot, prints the side-by-side table, then stops
(:mod:`netkv.mesh.demo`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import secrets
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import yaml

from netkv.adapters.topology_file import load_topology
from netkv.contracts.names import RedisKeys
from netkv.core.topology import Topology
from netkv.errors import InputError
from netkv.localservers import MosquittoServer, RedisServer, ServerError
from netkv.mesh.children import Child, MeshError, http_ready
from netkv.mesh.demo import DemoPlan, default_hot_host, demo_requests, run_demo
from netkv.mesh.fabric import DEVICE, PORT, EmulatedFabric
from netkv.mesh.inputs import (
    agent_addresses,
    check_ports,
    mqtt_endpoint,
    private_file,
    split_redis_url,
    workdir,
)
from netkv.signals import stop_on_signals
from netkv.supervisor import Supervisor

# Fixed defaults, in the 8090-8099 block: above the 8080/8081 that dev servers and proxies
# take by habit, below Prometheus's 9090 block. Redis and mosquitto, private to the mesh,
# run on free ports unless given.
PORTS = {"scheduler": 8090, "oracle": 8091, "standby oracle": 8092, "agent echo (udp)": 8093}
ORACLE_RESTARTS = 3


def demo_topology_path(split: bool = False) -> str:
    """The shipped demo cluster; ``split``: prefill and decode on separate hosts (--demo)."""
    from importlib import resources  # noqa: PLC0415 - only needed for the default path
    name = "topology-demo-split.yaml" if split else "topology-demo.yaml"
    return str(resources.files("netkv") / "data" / name)


def configure(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--topology", help="topology file (default: the shipped demo, 8 hosts, a prefill and "
      "a decode instance on each; with --demo, prefill and decode on alternate hosts)")
    p("--redis-url", help="use this Redis (redis://[:password@]host:port/db) instead of "
      "starting one; the password is kept out of argv, logs and world-readable files")
    p("--mqtt-url", help="use this broker (mqtt://host:port) instead of starting one")
    p("--scheduler-port", type=int, default=PORTS["scheduler"],
      help=f"scheduler HTTP port (default {PORTS['scheduler']})")
    p("--oracle-port", type=int, default=PORTS["oracle"],
      help=f"oracle HTTP port (default {PORTS['oracle']}; the standby takes the next one)")
    p("--echo-port", type=int, default=PORTS["agent echo (udp)"],
      help=f"agents' UDP echo port, one per agent address (default {PORTS['agent echo (udp)']})")
    p("--no-standby", action="store_true", help="run one oracle, no standby")
    p("--demo", action="store_true", help="replay the workload with cache_load and netkv "
      "under a hot link, print the comparison, then stop")
    p("--trace", help="Mooncake-format trace for --demo (default: NETKV_TRACE, else the "
      "embedded seeded workload, see `netkv trace`)")
    p("--hot-host", help="--demo: the host whose NIC downlink is made hot (default: the "
      "second decode host, h003 in the shipped demo)")
    p("--demo-requests", type=int, default=720, help="requests per policy (default 720)")
    p("--demo-rate", type=float, default=60.0,
      help="requests per second in the replay (default 60)")
    p("--ready-timeout", type=float, default=60.0,
      help="seconds each child may take to become ready (default 60)")
    p("--map-wait", type=float, default=45.0,
      help="seconds --demo waits for a congestion map from every agent (default 45)")
    p("--run-for", type=float, metavar="SECONDS", help="stop by itself after SECONDS")
    p("--no-agents", action="store_true", help="start no agents")
    p("--workdir", help="config and logs go here (default: a new directory under the "
      "system's temporary directory; kept after exit either way)")


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# -- the mesh -------------------------------------------------------------------------------
@dataclass
class Mesh:
    """What `netkv up` started, in order."""

    workdir: Path
    topology: Topology
    children: list[Child] = field(default_factory=list)
    listening: list[tuple[str, str]] = field(default_factory=list)
    fabric: EmulatedFabric | None = None
    token: str = ""
    redis_section: dict[str, Any] = field(default_factory=dict)

    def child(self, name: str) -> Child | None:
        return next((c for c in self.children if c.name == name), None)


async def _backing_servers(args: argparse.Namespace, mesh: Mesh,
                           stack: contextlib.AsyncExitStack) -> dict[str, Any]:
    """Redis and mosquitto (started, or given); returns the shared config sections."""
    if args.redis_url:
        mesh.redis_section, shown = split_redis_url(args.redis_url)
        mesh.listening.append(("redis", f"{shown} (given)"))
    else:
        redis = await stack.enter_async_context(RedisServer(workdir=mesh.workdir / "redis"))
        mesh.redis_section = {"url": redis.url}
        mesh.listening.append(("redis", redis.url))
    if args.mqtt_url:
        host, port = mqtt_endpoint(args.mqtt_url)
        mesh.listening.append(("mosquitto", f"mqtt://{host}:{port} (given)"))
    else:
        broker = await stack.enter_async_context(
            MosquittoServer(workdir=mesh.workdir / "mosquitto"))
        host, port = broker.host, broker.port
        mesh.listening.append(("mosquitto", f"mqtt://{host}:{port}"))
    return {"redis": mesh.redis_section, "mqtt": {"host": host, "port": port}}


def _agent_ready(mesh: Mesh, host: str) -> Any:
    keys = RedisKeys()
    section = mesh.redis_section

    async def check() -> tuple[bool, str]:
        client = aioredis.Redis.from_url(section["url"], password=section.get("password"),
                                         username=section.get("username"),
                                         socket_timeout=2, socket_connect_timeout=2)
        try:
            beat = await client.exists(keys.heartbeat(host))
        except (OSError, aioredis.RedisError) as exc:
            return False, f"Redis: {type(exc).__name__}"
        finally:
            await client.aclose()
        return bool(beat), "heartbeat in Redis" if beat else "no heartbeat in Redis yet"
    return check


def _plan_children(args: argparse.Namespace, mesh: Mesh, shared: dict[str, Any],
                   topology_path: str) -> None:
    python = [sys.executable, "-m", "netkv.cli"]
    wd = mesh.workdir
    base = {**shared, "topology": os.path.abspath(topology_path)}
    if not args.no_agents and _available("netkv_agent.cli"):
        addresses = agent_addresses(mesh.topology)
        if args.demo:
            topo = mesh.topology
            nic = topo.link_index[f"{topo.hosts[0].name}/nic/down"]
            mesh.fabric = EmulatedFabric(wd / "emulated-rdma", list(addresses),
                                         float(topo.capacity[nic]) * 8 / 1e9)
        for host, address in addresses.items():
            agent: dict[str, Any] = {"agent_id": host, "listen_address": address,
                                     "echo_port": args.echo_port}
            if mesh.fabric is not None:
                agent |= {"rdma_sysfs_root": str(mesh.fabric.sysfs_root(host)),
                          "rdma_fabric_port": f"{DEVICE}/{PORT}"}
            config = private_file(wd / f"agent-{host}.yaml", yaml.safe_dump(
                {**base, "agent": agent}))
            mesh.children.append(Child(
                f"agent {host}", [*python, "agent", "--config", str(config)],
                wd / f"agent-{host}.log", f"udp://{address}:{args.echo_port} (echo)",
                ready=_agent_ready(mesh, host)))
    elif not args.no_agents:
        print("netkv up: the agent is not part of this build; no agents started")
    oracle_ports = [args.oracle_port] + ([] if args.no_standby else [args.oracle_port + 1])
    if _available("netkv_oracle.cli"):
        for i, port in enumerate(oracle_ports):
            name = "oracle" if i == 0 else "standby oracle"
            config = private_file(wd / f"oracle-{i}.yaml", yaml.safe_dump({**base, "oracle": {
                "http_host": "127.0.0.1", "http_port": port, "oracle_id": f"up-oracle-{i}"}}))
            mesh.children.append(Child(
                name, [*python, "oracle", "--config", str(config)], wd / f"oracle-{i}.log",
                f"http://127.0.0.1:{port}",
                ready=http_ready(f"http://127.0.0.1:{port}/readyz"),
                restarts=ORACLE_RESTARTS))
    else:
        print("netkv up: the oracle is not part of this build; the scheduler will answer "
              "from tier priors")
    config = private_file(wd / "scheduler.yaml", yaml.safe_dump({**base, "scheduler": {
        "host": "127.0.0.1", "port": args.scheduler_port, "token": mesh.token}}))
    mesh.children.append(Child(
        "scheduler", [*python, "scheduler", "--config", str(config)], wd / "scheduler.log",
        f"http://127.0.0.1:{args.scheduler_port}",
        ready=http_ready(f"http://127.0.0.1:{args.scheduler_port}/readyz")))


@asynccontextmanager
async def _started(mesh: Mesh, env: Mapping[str, str], timeout_s: float
                   ) -> AsyncIterator[None]:
    """Start every child in order and wait until each is ready; stop them in reverse."""
    try:
        for child in mesh.children:
            await child.start(env)
        for child in mesh.children:
            await child.wait_ready(timeout_s)
        yield
    finally:
        for child in reversed(mesh.children):
            await child.stop()


def _print_listening(mesh: Mesh, args: argparse.Namespace) -> None:
    print("netkv up: listening (each child ready by its own check)")
    for name, where in mesh.listening:
        print(f"  {name:<16} {where}")
    for child in mesh.children:
        print(f"  {child.name:<16} {child.listens}  (pid {child.pid})")
    oracle = mesh.child("oracle")
    if oracle is not None:
        print(f"  {'live view':<16} http://127.0.0.1:{args.oracle_port}/view"
              f"?scheduler=http://127.0.0.1:{args.scheduler_port}")
    print(f"  {'token':<16} {mesh.token[:4]}... in {mesh.workdir / 'scheduler.token'} "
          "(Authorization: Bearer)")
    print(f"  {'logs':<16} {mesh.workdir}")


async def _until_stopped(args: argparse.Namespace, mesh: Mesh, sup: Supervisor,
                         stop: asyncio.Event) -> int:
    """Run the demo or wait for Ctrl-C / --run-for; a dead child ends it with 1."""
    work: asyncio.Task[Any] = sup.spawn(
        _demo(args, mesh) if args.demo else asyncio.sleep(args.run_for or 1e9),
        name="demo" if args.demo else "run", daemon=False)
    stopper = asyncio.ensure_future(stop.wait())
    failed = asyncio.ensure_future(sup.wait_failed())
    try:
        await asyncio.wait({work, stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (stopper, failed):
            fut.cancel()
        await asyncio.gather(stopper, failed, return_exceptions=True)
    if not sup.healthy:
        _report_dead(mesh, sup)
        return 1
    if work.done():
        return int(work.result()) if args.demo else 0
    return 130 if args.demo else 0  # Ctrl-C or SIGTERM


def _report_dead(mesh: Mesh, sup: Supervisor) -> None:
    dead = [c for c in mesh.children if c.exits and not c.alive]
    for c in dead:
        print(f"netkv up: {c.name} {c.exit_reason()} while the mesh was running; stopping "
              f"everything. Log {c.log}:\n{c.tail()}", file=sys.stderr)
    if not dead:
        print(f"netkv up: {sup.failures[0].name} {sup.failures[0].reason}; stopping "
              "everything", file=sys.stderr)


async def up(args: argparse.Namespace) -> int:
    topology_path = args.topology or demo_topology_path(split=args.demo)
    topology = load_topology(topology_path)
    if args.demo and not any(i.role == "prefill" for i in topology.instances):
        raise InputError(topology_path, "--demo needs prefill instances in the topology")
    if args.hot_host and args.hot_host not in topology.host_index:
        raise InputError("--hot-host", f"{args.hot_host!r} is not a host of {topology_path}")
    requests = demo_requests(args.trace or args.environ.get("NETKV_TRACE"),
                             args.demo_requests) if args.demo else []
    check_ports(args, {} if args.no_agents else agent_addresses(topology))
    mesh = Mesh(workdir(args.workdir), topology)
    if args.environ.get("NETKV_TOKEN", None) == "":
        raise InputError("NETKV_TOKEN", "is set but empty; unset it to have a token generated")
    mesh.token = args.environ.get("NETKV_TOKEN") or secrets.token_urlsafe(32)
    private_file(mesh.workdir / "scheduler.token", mesh.token + "\n")
    args.requests = requests
    env = {k: v for k, v in args.environ.items() if not k.startswith("NETKV_")}
    env["PYTHONUNBUFFERED"] = "1"
    with stop_on_signals() as stop:
        async with contextlib.AsyncExitStack() as stack:
            shared = await _backing_servers(args, mesh, stack)
            _plan_children(args, mesh, shared, topology_path)
            await stack.enter_async_context(_started(mesh, env, args.ready_timeout))
            sup = await stack.enter_async_context(Supervisor("netkv-up"))
            _watch(mesh, sup)
            _print_listening(mesh, args)
            print("Ctrl-C stops everything." if not args.demo else "running the demo ...",
                  flush=True)
            code = await _until_stopped(args, mesh, sup, stop)
            print("netkv up: stopping scheduler, oracles, agents, broker, redis ...", flush=True)
    print(f"netkv up: stopped; logs kept in {mesh.workdir}")
    return code


def _watch(mesh: Mesh, sup: Supervisor) -> None:
    def restarted(child: Child) -> None:
        print(f"netkv up: {child.name} {child.exit_reason()}; restarting it "
              f"({child.restarts} restarts left)", file=sys.stderr, flush=True)
    for child in mesh.children:
        sup.spawn(child.watch(restarted), name=child.name)
    if mesh.fabric is not None:
        sup.spawn(mesh.fabric.run(), name="emulated fabric")


async def _demo(args: argparse.Namespace, mesh: Mesh) -> int:
    topo = mesh.topology
    hot = (args.hot_host or default_hot_host(topo)) if mesh.fabric else None
    plan = DemoPlan(f"http://127.0.0.1:{args.scheduler_port}", topo, args.requests,
                    [i.name for i in topo.instances if i.role == "prefill"], args.demo_rate,
                    mesh.fabric, hot, token=mesh.token)
    view = (f"http://127.0.0.1:{args.oracle_port}/view"
            f"?scheduler=http://127.0.0.1:{args.scheduler_port}")
    return await run_demo(plan, args.map_wait, view)


def run(args: argparse.Namespace) -> int:
    if args.demo_requests < 1 or args.demo_rate <= 0:
        raise InputError("--demo-requests/--demo-rate", "must be > 0")
    try:
        return asyncio.run(up(args))
    except (MeshError, ServerError) as exc:
        print(f"netkv up: {exc}", file=sys.stderr)
        return 1


__all__ = ["PORTS", "configure", "run", "up"]
