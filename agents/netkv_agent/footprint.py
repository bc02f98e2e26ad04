"""How much CPU one agent costs: one measured agent in its own process among N real peers.

The measured agent runs in a child process (so its CPU time is its own, read with
``getrusage``, which resolves microseconds where ``os.times`` counts 10 ms clock ticks: 0.1%
of a core over a 10 s run); its ``peers`` are real agents running as tasks in this process, on
distinct 127.0.x.y addresses, all publishing to one real redis-server (started here unless a
URL is given). Every agent probes, answers probes, reads counters (``lo`` as its fabric NIC,
so the netlink path is exercised) and publishes; so the measured agent pays for what it
sends *and* for what it answers.

Two layouts:

* ``fat-tree``: 8 hosts per leaf, 4 leaves per pod; the pinglist is dense in the leaf and
  sparse beyond (what a deployment runs);
* ``one-leaf``: every host in one leaf, so every peer is probed at the leaf interval (the
  worst case for a given peer count).

Run ``python -m netkv_agent.footprint --peers 64 --seconds 10 --out cpu.json``; the telemetry
benchmark imports :func:`measure_agent_cpu`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import resource
import time
from multiprocessing.connection import Connection
from typing import Any, Literal

from netkv.config import MqttSettings, RedisSettings
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.localservers import RedisServer
from netkv_agent.agent import Agent, run_agents
from netkv_agent.settings import AgentSettings

Layout = Literal["fat-tree", "one-leaf"]
WIRE_OVERHEAD = 28  # IPv4 + UDP headers per echo datagram


def host_address(i: int) -> str:
    """A distinct loopback address per host (127.0.1.1, 127.0.1.2, ...)."""
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


def layout_topology(hosts: int, layout: Layout) -> Topology:
    entries = []
    for i in range(hosts):
        leaf, pod = (0, 0) if layout == "one-leaf" else (i // 8, i // 32)
        entries.append({"name": f"h{i:03d}", "leaf": f"leaf{pod}.{leaf}", "pod": f"pod{pod}",
                        "address": host_address(i)})
    return parse_topology({"hosts": entries}, "footprint")


def agent_settings(topology: Topology, index: int, redis_url: str, *,
                   base: AgentSettings | None = None, counters: bool = True) -> AgentSettings:
    """Settings for host ``index``; ``counters=False`` for load-generating peers (their
    counter reads would only load this process, not the measured agent)."""
    host = topology.hosts[index]
    return (base or AgentSettings()).model_copy(update={
        "agent_id": host.name, "listen_address": host.address or host_address(index),
        "redis": RedisSettings(url=redis_url), "mqtt": MqttSettings(), "mqtt_enabled": False,
        "fabric_nic": "lo" if counters else None, "rdma_enabled": False})


async def _measure_child(settings: AgentSettings, topology: Topology, warmup_s: float,
                         seconds: float) -> dict[str, Any]:
    async with Agent(settings, topology) as agent:
        await asyncio.sleep(warmup_s)
        t0, wall0, s0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic(), \
            agent.stats()
        await asyncio.sleep(seconds)
        t1, wall1, s1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic(), \
            agent.stats()
    wall = wall1 - wall0
    user, system = t1.ru_utime - t0.ru_utime, t1.ru_stime - t0.ru_stime
    datagrams = sum(s1[k] - s0[k] for k in ("probes_sent", "replies", "lost"))
    answered = s1["requests_answered"] - s0["requests_answered"]
    return {
        "cpu_fraction": (user + system) / wall, "user_fraction": user / wall,
        "system_fraction": system / wall, "wall_s": wall,
        "pinglist": s1["pinglist"], "peers_registered": s1["peers_registered"],
        "probes_per_s": (s1["probes_sent"] - s0["probes_sent"]) / wall,
        "answered_per_s": answered / wall,
        "echo_ticks_per_s": (s1["echo_ticks"] - s0["echo_ticks"]) / wall,
        "rounds_per_s": (s1["probe_rounds"] - s0["probe_rounds"]) / wall,
        # bytes this agent put on the wire for probing: its requests and its answers
        "probe_bytes_per_s": (s1["probes_sent"] - s0["probes_sent"] + answered)
        * (20 + WIRE_OVERHEAD) / wall,
        "samples_per_s": (s1["samples_published"] - s0["samples_published"]) / wall,
        "lost": s1["lost"] - s0["lost"], "resolved": datagrams,
    }


def _child_main(settings: AgentSettings, topology: Topology, warmup_s: float, seconds: float,
                conn: Connection) -> None:
    try:
        conn.send(asyncio.run(_measure_child(settings, topology, warmup_s, seconds)))
    except BaseException as exc:
        conn.send({"error": repr(exc)})
        raise
    finally:
        conn.close()


def _peers_main(settings: list[AgentSettings], topology: Topology, seconds: float) -> None:
    asyncio.run(run_agents(settings, topology, seconds))


async def measure_agent_cpu(peers: int = 64, seconds: float = 10.0, *,
                            layout: Layout = "fat-tree", redis_url: str | None = None,
                            warmup_s: float = 3.0, peer_processes: int = 0,
                            base: AgentSettings | None = None) -> dict[str, Any]:
    """CPU fraction of one core used by one agent with ``peers`` live peers (see module).

    ``peer_processes=0`` runs the peers as tasks of this process; ``k > 0`` spreads them
    over ``k`` worker processes (so that one busy event loop does not delay their answers).
    """
    topology = layout_topology(peers + 1, layout)
    ctx = multiprocessing.get_context("spawn")
    workers: list[Any] = []
    async with contextlib.AsyncExitStack() as stack:
        if redis_url is None:
            redis_url = (await stack.enter_async_context(RedisServer())).url
        peer_settings = [agent_settings(topology, i, redis_url, base=base, counters=False)
                         for i in range(1, peers + 1)]
        if peer_processes <= 0:
            for s in peer_settings:
                await stack.enter_async_context(Agent(s, topology))
        else:
            for k in range(peer_processes):
                worker = ctx.Process(target=_peers_main, args=(
                    peer_settings[k::peer_processes], topology, warmup_s + seconds + 5),
                    daemon=True)
                worker.start()
                workers.append(worker)
            stack.callback(_reap, workers)
            await asyncio.sleep(2.0)  # let the peers register
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, args=(
            agent_settings(topology, 0, redis_url, base=base), topology, warmup_s, seconds,
            child), daemon=True)
        proc.start()
        child.close()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + warmup_s + seconds + 30
            while not parent.poll():
                if loop.time() > deadline or (not proc.is_alive() and not parent.poll()):
                    raise RuntimeError("the measured agent did not report")
                await asyncio.sleep(0.2)
            result: dict[str, Any] = parent.recv()
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
            parent.close()
    if "error" in result:
        raise RuntimeError(f"measured agent failed: {result['error']}")
    return {"peers": peers, "layout": layout, "seconds": seconds, **result}


def _reap(processes: list[Any]) -> None:
    for proc in processes:
        proc.terminate()
    for proc in processes:
        proc.join(5)
        if proc.is_alive():
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--layout", choices=["fat-tree", "one-leaf", "both"], default="both")
    parser.add_argument("--peer-processes", type=int, default=0,
                        help="run the peers in this many worker processes (0: as tasks here)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    layouts: list[Layout] = ["fat-tree", "one-leaf"] if args.layout == "both" else [args.layout]
    rows = [asyncio.run(measure_agent_cpu(args.peers, args.seconds, layout=layout,
                                          peer_processes=args.peer_processes))
            for layout in layouts]
    print(f"{'layout':<10} {'peers':>5} {'pinglist':>8} {'probes/s':>9} {'answered/s':>10} "
          f"{'probe B/s':>10} {'samples/s':>9} {'cpu % core':>10}")
    for r in rows:
        print(f"{r['layout']:<10} {r['peers']:>5} {r['pinglist']:>8} {r['probes_per_s']:>9.1f} "
              f"{r['answered_per_s']:>10.1f} {r['probe_bytes_per_s']:>10.0f} "
              f"{r['samples_per_s']:>9.1f} {100 * r['cpu_fraction']:>10.2f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
