"""`netkv up`: the whole mesh on one machine, stopped cleanly with Ctrl-C.

Starts (or connects to, when URLs are given) ``redis-server`` and ``mosquitto`` on free loopback
ports, one agent per host of the topology on its own loopback address (127.0.0.x), the oracle
and the scheduler, each as a child process with its log in the work directory; prints where
everything listens. Ctrl-C or SIGTERM stops them in reverse order of start (scheduler, oracle,
agents, broker, Redis), each with a bounded wait and then SIGKILL, and removes the work
directory, leaving no process or port behind. Children also get SIGTERM from the kernel if
``netkv up`` itself dies (``PR_SET_PDEATHSIG``).

``--demo`` replays a slice of the Mooncake trace against the scheduler over HTTP once the map
is in, prints decisions per second, decision latency and the choices by tier, then stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import ipaddress
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from netkv.core.topology import Topology
from netkv.core.topology_file import load_topology
from netkv.errors import InputError
from netkv.localservers import MosquittoServer, RedisServer, ServerError, free_port, wait_for_port
from netkv.workload.synth import synthesise
from netkv.workload.trace import load_trace

STOP_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1


def demo_topology_path() -> str:
    from importlib import resources  # noqa: PLC0415 - only needed for the default path
    return str(resources.files("netkv") / "data" / "topology-demo.yaml")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", help="topology file (default: the shipped demo, 8 hosts)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--mqtt-url", help="use this broker (mqtt://host:port) instead of "
                        "starting one")
    parser.add_argument("--scheduler-port", type=int, default=0,
                        help="scheduler HTTP port (default: a free one)")
    parser.add_argument("--oracle-port", type=int, default=0,
                        help="oracle HTTP port (default: a free one)")
    parser.add_argument("--demo", action="store_true",
                        help="replay a slice of the trace against the scheduler, print a "
                        "summary, then stop")
    parser.add_argument("--trace", help="Mooncake-format trace for --demo (default: "
                        "NETKV_TRACE, else the embedded seeded workload, see `netkv trace`)")
    parser.add_argument("--demo-requests", type=int, default=2000,
                        help="trace lines to replay (default 2000)")
    parser.add_argument("--demo-concurrency", type=int, default=8,
                        help="concurrent HTTP connections for the replay (default 8)")
    parser.add_argument("--map-wait", type=float, default=45.0,
                        help="seconds --demo waits for the first congestion map (default 45)")
    parser.add_argument("--run-for", type=float, metavar="SECONDS",
                        help="stop by itself after SECONDS")
    parser.add_argument("--no-agents", action="store_true", help="start no agents")
    parser.add_argument("--workdir", help="keep config and logs here (default: a temporary "
                        "directory, removed at exit)")


# -- child processes ------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child: ask the kernel for SIGTERM when the parent goes away (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One child process of the mesh."""

    name: str
    argv: list[str]
    log: Path
    listens: str
    proc: asyncio.subprocess.Process | None = None

    async def start(self, env: Mapping[str, str]) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                env=dict(env), start_new_session=True, preexec_fn=_die_with_parent)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def tail(self, chars: int = 800) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@asynccontextmanager
async def running(child: Child, env: Mapping[str, str]) -> AsyncIterator[Child]:
    await child.start(env)
    try:
        yield child
    finally:
        await child.stop()


def _free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def agent_addresses(topology: Topology) -> dict[str, str]:
    """Each host's loopback address: its topology address if it is one, else 127.0.0.11+."""
    out: dict[str, str] = {}
    for i, host in enumerate(topology.hosts):
        address = host.address
        if address is None or not ipaddress.ip_address(address).is_loopback:
            address = str(ipaddress.IPv4Address("127.0.0.11") + i)
        out[host.name] = address
    return out


def _mqtt_endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise InputError("--mqtt-url", f"expected mqtt://host:port, got {url!r}")
    return parts.hostname, parts.port or 1883


# -- the demo -------------------------------------------------------------------------------
def demo_requests(trace: str | None, count: int) -> list[dict[str, Any]]:
    """The first ``count`` requests of the trace at ``trace`` (strictly parsed), or of the
    embedded seeded workload when no trace is given."""
    loaded = load_trace(trace, limit=count) if trace else synthesise(count)
    return [{"prompt_tokens": int(n_in), "block_hashes": list(ids), "output_tokens": int(n_out)}
            for n_in, n_out, ids in zip(loaded.input_tokens.tolist(),
                                        loaded.output_tokens.tolist(), loaded.hash_ids,
                                        strict=True)]


async def wait_ready(base: str, timeout_s: float) -> dict[str, Any] | None:
    """Poll ``/readyz`` until the scheduler holds a map; None on timeout."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{base}/readyz") as resp:
                    if resp.status == 200:
                        body: dict[str, Any] = await resp.json()
                        return body
            await asyncio.sleep(0.25)
    return None


async def server_decision_quantiles(base: str, policy: str = "netkv") -> dict[float, float]:
    """p50/p99 of the scheduler's in-process decision time, from its histogram buckets
    (upper bucket bounds: an over-estimate by at most one bucket)."""
    buckets: list[tuple[float, float]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        try:
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return {}
    for family in text_string_to_metric_families(text):
        if family.name != "netkv_decision_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("policy") == policy:
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return {}
    total = buckets[-1][1]
    out: dict[float, float] = {}
    for q in (0.5, 0.99):
        out[q] = next(b for b, count in buckets if count >= q * total) * 1e3
    return out


async def replay(base: str, requests: list[dict[str, Any]], prefills: list[str],
                 concurrency: int, open_window: int = 64) -> dict[str, Any]:
    """Send every request as ``POST /v1/select`` (closed loop) and release each one after
    ``open_window`` later decisions, like requests finishing. Returns the summary."""
    latencies: list[float] = []
    tiers: Counter[int] = Counter()
    decoders: Counter[str] = Counter()
    stale = 0
    versions: set[int | None] = set()
    errors: list[str] = []
    predicted: list[float] = []
    open_ids: deque[str] = deque()
    next_index = 0
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal next_index, stale
        while next_index < len(requests):
            i = next_index
            next_index += 1
            body = {"request_id": f"demo-{i}", "prefill": prefills[i % len(prefills)],
                    **requests[i]}
            start = time.perf_counter()
            async with http.post(f"{base}/v1/select", json=body) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}: {answer}")
                    continue
            latencies.append(time.perf_counter() - start)
            tiers[answer["tier"]] += 1
            decoders[answer["decode"]] += 1
            stale += bool(answer["map_stale"])
            versions.add(answer["map_version"])
            predicted.append(answer["predicted_ttft_ms"])
            open_ids.append(body["request_id"])
            if len(open_ids) > open_window:
                old = open_ids.popleft()
                async with http.post(f"{base}/v1/release", json={"request_id": old}) as resp:
                    await resp.read()

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        for rid in open_ids:
            async with http.post(f"{base}/v1/release", json={"request_id": rid}) as resp:
                await resp.read()
    ms = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    server = await server_decision_quantiles(base)
    return {"server_p50_ms": server.get(0.5), "server_p99_ms": server.get(0.99),
            "decisions": len(latencies), "errors": len(errors),
            "first_error": errors[0] if errors else None, "seconds": elapsed,
            "decisions_per_s": len(latencies) / elapsed if elapsed > 0 else 0.0,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "tiers": dict(sorted(tiers.items())), "decoders": len(decoders),
            "busiest": decoders.most_common(3), "stale": stale,
            "map_versions": sorted(v for v in versions if v is not None),
            "predicted_ttft_p50_ms": float(np.percentile(predicted, 50)) if predicted else 0.0}


def print_summary(summary: dict[str, Any], concurrency: int) -> None:
    names = {0: "same host", 1: "same leaf", 2: "same pod", 3: "across core"}
    n = max(summary["decisions"], 1)
    print("\n=== NetKV demo: trace replay against the scheduler over HTTP ===")
    print(f"decisions        {summary['decisions']} in {summary['seconds']:.2f} s "
          f"({concurrency} connections), errors {summary['errors']}")
    print(f"decisions/s      {summary['decisions_per_s']:.0f}")
    print(f"latency (HTTP)   p50 {summary['p50_ms']:.2f} ms   p99 {summary['p99_ms']:.2f} ms")
    if summary["server_p50_ms"] is not None:
        print(f"decision (server) p50 <= {summary['server_p50_ms']:.2f} ms   "
              f"p99 <= {summary['server_p99_ms']:.2f} ms   (histogram bucket bounds)")
    versions = summary["map_versions"]
    print(f"congestion map   versions {versions[0] if versions else '-'}.."
          f"{versions[-1] if versions else '-'}; {summary['stale']} answers used tier priors")
    print(f"predicted TTFT   p50 {summary['predicted_ttft_p50_ms']:.1f} ms")
    print("choices by tier:")
    for tier in range(4):
        count = summary["tiers"].get(tier, 0)
        print(f"  tier {tier} {names[tier]:<12} {count:>6}  {100 * count / n:5.1f} %")
    print(f"decoders used    {summary['decoders']}; busiest "
          + ", ".join(f"{d} ({c})" for d, c in summary["busiest"]))
    if summary["first_error"]:
        print(f"first error      {summary['first_error']}")


# -- the mesh -------------------------------------------------------------------------------
def _absolute(path: str) -> str:
    return os.path.abspath(path)


def _workdir(given: str | None) -> Path:
    path = Path(given or tempfile.mkdtemp(prefix="netkv-up-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


async def up(args: argparse.Namespace) -> int:
    topology_path = args.topology or demo_topology_path()
    topology = load_topology(topology_path)
    prefills = [i.name for i in topology.instances if i.role == "prefill"]
    if args.demo:
        requests = demo_requests(args.trace or args.environ.get("NETKV_TRACE"),
                                 args.demo_requests)
        if not prefills:
            raise InputError(topology_path, "--demo needs prefill instances in the topology")
    own_dir = args.workdir is None
    workdir = _workdir(args.workdir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    env = {k: v for k, v in args.environ.items() if not k.startswith("NETKV_")}
    env["PYTHONUNBUFFERED"] = "1"
    python = [sys.executable, "-m", "netkv.cli"]
    listening: list[tuple[str, str]] = []
    code = 0
    try:
        async with contextlib.AsyncExitStack() as stack:
            if args.redis_url:
                redis_url = args.redis_url
                listening.append(("redis", f"{redis_url} (given)"))
            else:
                redis = await stack.enter_async_context(
                    RedisServer(workdir=workdir / "redis"))
                redis_url = redis.url
                listening.append(("redis", redis_url))
            if args.mqtt_url:
                mqtt_host, mqtt_port = _mqtt_endpoint(args.mqtt_url)
                listening.append(("mosquitto", f"mqtt://{mqtt_host}:{mqtt_port} (given)"))
            else:
                broker = await stack.enter_async_context(
                    MosquittoServer(workdir=workdir / "mosquitto"))
                mqtt_host, mqtt_port = broker.host, broker.port
                listening.append(("mosquitto", f"mqtt://{mqtt_host}:{mqtt_port}"))
            scheduler_port = args.scheduler_port or free_port()
            oracle_port = args.oracle_port or free_port()
            config = workdir / "netkv.yaml"
            config.write_text(yaml.safe_dump({
                "redis": {"url": redis_url}, "mqtt": {"host": mqtt_host, "port": mqtt_port},
                "topology": _absolute(topology_path),
                "scheduler": {"host": "127.0.0.1", "port": scheduler_port},
                "oracle": {"http_host": "127.0.0.1", "http_port": oracle_port},
            }))
            children: list[Child] = []
            if not args.no_agents and _available("netkv_agent.cli"):
                for host, address in agent_addresses(topology).items():
                    port = _free_udp_port(address)
                    children.append(Child(
                        f"agent {host}",
                        [*python, "agent", "--config", str(config), "--agent-id", host,
                         "--listen-address", address, "--echo-port", str(port)],
                        workdir / f"agent-{host}.log", f"udp://{address}:{port} (echo)"))
            elif not args.no_agents:
                print("netkv up: the agent is not part of this build; no agents started")
            if _available("netkv_oracle.cli"):
                children.append(Child("oracle", [*python, "oracle", "--config", str(config)],
                                       workdir / "oracle.log",
                                       f"http://127.0.0.1:{oracle_port}"))
            else:
                print("netkv up: the oracle is not part of this build; the scheduler will "
                      "answer from tier priors")
            scheduler = Child("scheduler", [*python, "scheduler", "--config", str(config)],
                              workdir / "scheduler.log", f"http://127.0.0.1:{scheduler_port}")
            children.append(scheduler)
            for child in children:  # started in order, stopped in reverse by the stack
                await stack.enter_async_context(running(child, env))
            try:
                await wait_for_port("127.0.0.1", scheduler_port, 60.0)
                if any(c.name == "oracle" for c in children):
                    await wait_for_port("127.0.0.1", oracle_port, 60.0)
            except ServerError as exc:
                dead = [c for c in children if c.proc and c.proc.returncode is not None]
                for c in dead or children[-1:]:
                    print(f"netkv up: {c.name} failed; log tail:\n{c.tail()}", file=sys.stderr)
                raise ServerError(str(exc)) from None
            listening += [(c.name, c.listens) for c in children]
            print("netkv up: listening")
            for name, where in listening:
                print(f"  {name:<14} {where}")
            print(f"  {'logs':<14} {workdir}")
            print("Ctrl-C stops everything." if not args.demo else "running the demo ...",
                  flush=True)
            base = f"http://127.0.0.1:{scheduler_port}"
            if args.demo:
                has_oracle = any(c.name == "oracle" for c in children)
                code = await _demo(args, base, requests, prefills, stop,
                                   map_wait_s=args.map_wait if has_oracle else 0.0)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.run_for)
            print("netkv up: stopping scheduler, oracle, agents, broker, redis ...", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    print("netkv up: stopped")
    return code


async def _demo(args: argparse.Namespace, base: str, requests: list[dict[str, Any]],
                prefills: list[str], stop: asyncio.Event, *, map_wait_s: float) -> int:
    waiter = asyncio.ensure_future(wait_ready(base, map_wait_s))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if stop.is_set():
        waiter.cancel()
        return 130
    ready = waiter.result()
    if ready is None:
        print(f"netkv up: no congestion map after {map_wait_s:.0f} s; the demo runs on "
              "tier priors")
    else:
        print(f"netkv up: scheduler ready ({ready['status']}), map version "
              f"{ready['map_version']}", flush=True)
    task = asyncio.ensure_future(replay(base, requests, prefills, args.demo_concurrency))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return 130
    summary = task.result()
    print_summary(summary, args.demo_concurrency)
    return 0 if summary["errors"] == 0 and summary["decisions"] > 0 else 1


def run(args: argparse.Namespace) -> int:
    if args.demo_requests < 1 or args.demo_concurrency < 1:
        raise InputError("--demo-requests/--demo-concurrency", "must be >= 1")
    try:
        return asyncio.run(up(args))
    except ServerError as exc:
        print(f"netkv up: {exc}", file=sys.stderr)
        return 1


__all__ = ["configure", "run", "up"]
