"""`netkv bench scheduler`: decision latency and throughput of the scheduler over real HTTP.

The scheduler runs in its own process (a fat-tree with ``--decoders`` decode instances and a
freshly measured congestion map, so ``netkv`` pays for the full oracle path), served the way
``netkv scheduler`` serves it (:func:`netkv.http.server.serving` with the settings' HTTP
limits, logging configured at the settings' level); the load comes from this process:
``--concurrency`` keep-alive HTTP/1.1 connections, each sending the next ``POST /v1/select``
as soon as the answer arrives (closed loop), with a raw asyncio client so the generator's own
cost stays small. Every select books its decoder (reservations expire after 2 s, keeping the
book steady).

The same load then runs against two constant answers, so the framework's share is visible:

* ``floor`` (the ratio's denominator): the scheduler's own HTTP edge with nothing behind it:
  the same ``serving()`` (connection guard, header deadline, keep-alive and size limits), the
  same :mod:`netkv.http` middleware stack (JSON errors, auth, JSON-only and body limit) and
  ``client_max_size``; the handler reads the body and answers a constant;
* ``bare`` (for reference): a bare aiohttp handler under ``web.run_app`` with aiohttp's
  defaults and no middlewares: what the edge itself costs is ``bare`` against ``floor``.

Where the C decision kernel was built (:mod:`netkv.routing._kernel`), a fourth server,
``numpy``, is the scheduler with that kernel off (the same decisions on the fused numpy path;
the prefix loops stay in C), so the kernel's gain is measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from netkv_scheduler.app import SELECTOR, create_app
from netkv_scheduler.settings import SchedulerSettings

from netkv.core.congestion import CongestionMap
from netkv.core.prefix_cache import BLOCK_TOKENS
from netkv.core.topology_file import parse_topology
from netkv.http.middlewares import middlewares
from netkv.http.server import serving
from netkv.localservers import free_port, wait_for_port
from netkv.logs import configure_logging
from netkv.routing.fused import KERNEL_BUILT
from netkv.routing.mapfeed import MapFeed
from netkv.signals import stop_on_signals

KINDS = ("bare", "floor", "scheduler", "numpy")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoders", type=int, default=64, help="decode instances (|D|)")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument("--requests", type=int, default=6000, help="measured selects per run")
    parser.add_argument("--warmup", type=int, default=500, help="unmeasured selects first")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="keep-alive connections in the closed loop")
    parser.add_argument("--policy", default="netkv", help="policy the scheduler uses")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternate floor/scheduler runs this many times and keep each "
                        "one's best (the machine is shared: this damps other load)")


def fat_tree_for(decoders: int) -> dict[str, int]:
    """A fat-tree with one prefill and one decode instance per host and ``decoders`` hosts."""
    hpl = next(h for h in (16, 8, 4, 2, 1) if (decoders % h == 0 and decoders // h >= 4)
               or h == 1)
    rest = decoders // hpl
    pods = next(p for p in (8, 4, 2, 1) if (rest % p == 0 and rest // p >= 2) or p == 1)
    return {"pods": pods, "leaves_per_pod": rest // pods, "hosts_per_leaf": hpl,
            "gpus_per_host": 8, "instance_gpus": 4}


# -- the server side (a separate process) -----------------------------------------------------
CONSTANT = json.dumps({"decode": "h000-d1", "predicted_ttft_ms": 1.0}).encode()


async def _constant(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=CONSTANT, content_type="application/json")


def _scheduler_app(settings: SchedulerSettings, decoders: int,
                   clock: Callable[[], float] = time.time) -> web.Application:
    """The bench's scheduler; ``clock`` drives its map feed and map (``netkv bench select``
    gives a virtual one; the selector's own clocks are its attributes)."""
    topology = parse_topology({"fabric": {"leaf_oversubscription": 2,
                                          "pod_oversubscription": 3},
                               "fat_tree": fat_tree_for(decoders)})
    feed = MapFeed(topology, None, None, stale_s=settings.map_stale_s,
                   cache_s=settings.oracle_cache_s, clock=clock)
    cmap = CongestionMap(topology, clock=clock)
    rng = np.random.default_rng(0)
    now = clock()
    for i, link in enumerate(topology.links):
        cmap.observe_link(i, float(rng.uniform(0, 0.8)) * link.capacity_bytes_s, now)
    cmap.version, cmap.created_ts = 1, now
    feed.install(cmap)
    return create_app(settings, topology, feed)


async def _serve_until_signal(app: web.Application, settings: SchedulerSettings) -> None:
    """Serve ``app`` as ``netkv scheduler`` does, until SIGINT/SIGTERM."""
    async with serving(app, "127.0.0.1", settings.port, settings.http_limits()):
        with stop_on_signals() as stop:
            await stop.wait()


def _serve(kind: str, decoders: int, port: int, policy: str) -> None:
    settings = SchedulerSettings(port=port, policy=policy, reservation_ttl_s=2.0,
                                 map_stale_s=3600.0, log_level="warning")
    configure_logging(settings.log_level)
    if kind == "bare":
        app = web.Application()
        app.router.add_post("/v1/select", _constant)
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                    handle_signals=True, shutdown_timeout=1.0)
        return
    if kind == "floor":  # the scheduler's edge (see create_app), a constant behind it
        app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares(
            token=settings.token, max_body_bytes=settings.max_body_bytes))
        app.router.add_post("/v1/select", _constant)
    else:
        app = _scheduler_app(settings, decoders)
        if kind == "numpy":  # the same decisions without the C kernel
            for fused in app[SELECTOR].fused.values():
                fused.kernel = None
    asyncio.run(_serve_until_signal(app, settings))


# -- the load generator (this process) --------------------------------------------------------
def _requests(count: int, decoders: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        tokens = rng.randint(500, 16000)
        blocks = -(-tokens // BLOCK_TOKENS)
        # Prefix-chained block ids as in the Mooncake trace: one shared system block, then a
        # conversation's history (shared by its turns), then blocks of this turn alone.
        conversation = rng.randrange(200)
        history = min(rng.randrange(blocks), 8)
        hashes = [0] + [1_000 + conversation * 100 + k for k in range(history)]
        hashes += [10**6 + seed * 10**8 + i * 64 + k for k in range(blocks - len(hashes))]
        body = json.dumps({"request_id": f"b{seed}-{i}",
                           "prefill": f"h{rng.randrange(decoders):03d}-p0",
                           "prompt_tokens": tokens, "block_hashes": hashes[:blocks]},
                          separators=(",", ":")).encode()
        out.append(b"POST /v1/select HTTP/1.1\r\nHost: bench\r\nContent-Type: "
                   b"application/json\r\nContent-Length: " + str(len(body)).encode()
                   + b"\r\n\r\n" + body)
    return out


async def _connection(port: int, queue: list[bytes], latencies: list[float],
                      errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while queue:
            payload = queue.pop()
            start = time.perf_counter()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append((head.split(b"\r\n")[0] + b" " + body[:200]).decode())
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _load(port: int, requests: list[bytes], concurrency: int) -> \
        tuple[list[float], float, list[str]]:
    latencies: list[float] = []
    errors: list[str] = []
    queue = list(reversed(requests))
    start = time.perf_counter()
    await asyncio.gather(*(_connection(port, queue, latencies, errors)
                           for _ in range(concurrency)))
    return latencies, time.perf_counter() - start, errors


def _cpu_s(pid: int) -> float | None:
    """User plus system CPU seconds of process ``pid`` so far (None where /proc is absent)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(kind: str, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    env = dict(args.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "netkv.bench.scheduler", kind, str(args.decoders), str(port),
         args.policy], env=env, stdin=subprocess.DEVNULL)
    try:
        asyncio.run(wait_for_port("127.0.0.1", port, 60.0))
        warm = _requests(args.warmup, args.decoders, seed=1)
        asyncio.run(_load(port, warm, args.concurrency))
        reqs = _requests(args.requests, args.decoders, seed=2)
        cpu_before = _cpu_s(proc.pid)
        latencies, elapsed, errors = asyncio.run(_load(port, reqs, args.concurrency))
        cpu_after = _cpu_s(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if errors:
        raise RuntimeError(f"{kind}: {len(errors)} failed requests, first: {errors[0]}")
    ms = np.array(latencies) * 1e3
    cpu_us = (float("nan") if cpu_before is None or cpu_after is None
              else (cpu_after - cpu_before) / len(latencies) * 1e6)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "decisions_per_s": len(latencies) / elapsed, "server_cpu_us": cpu_us}


def run(args: argparse.Namespace) -> int:
    if min(args.decoders, args.requests, args.concurrency, args.rounds) < 1:
        print("netkv bench scheduler: --decoders, --requests, --concurrency and --rounds "
              "must be >= 1", file=sys.stderr)
        return 2
    kinds = KINDS if KERNEL_BUILT else KINDS[:3]
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            runs[kind].append(_measure(kind, args))
    best = {kind: max(runs[kind], key=lambda r: r["decisions_per_s"]) for kind in kinds}
    bare, floor, sched = best["bare"], best["floor"], best["scheduler"]
    result: dict[str, Any] = {
        "decoders": args.decoders, "p50_ms": round(sched["p50_ms"], 4),
        "p99_ms": round(sched["p99_ms"], 4),
        "decisions_per_s": round(sched["decisions_per_s"], 1),
        "floor_p99_ms": round(floor["p99_ms"], 4),
        "floor_decisions_per_s": round(floor["decisions_per_s"], 1),
        "floor_p50_ms": round(floor["p50_ms"], 4),
        "bare_p50_ms": round(bare["p50_ms"], 4), "bare_p99_ms": round(bare["p99_ms"], 4),
        "bare_decisions_per_s": round(bare["decisions_per_s"], 1),
        "server_cpu_us": {kind: round(best[kind]["server_cpu_us"], 1) for kind in kinds},
        "kernel": KERNEL_BUILT,
        "concurrency": args.concurrency, "requests": args.requests, "policy": args.policy,
        "rounds": args.rounds, "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if "numpy" in best:
        numpy_path = best["numpy"]
        result.update({f"numpy_{key}": round(numpy_path[key], 4 if "ms" in key else 1)
                       for key in ("p50_ms", "p99_ms", "decisions_per_s")})
    print(f"{'server':<10} {'p50 ms':>8} {'p99 ms':>8} {'decisions/s':>12} {'server CPU':>11}")
    for kind in kinds:
        r = best[kind]
        print(f"{kind:<10} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
              f"{r['decisions_per_s']:>12.0f} {r['server_cpu_us']:>8.0f} us")
    for name, base in (("floor", floor), ("bare", bare)):
        print(f"{'vs ' + name:<10} {sched['p50_ms'] / base['p50_ms']:>8.2f} "
              f"{sched['p99_ms'] / base['p99_ms']:>8.2f} "
              f"{sched['decisions_per_s'] / base['decisions_per_s']:>12.2f}")
    print(f"(|D| = {args.decoders}, {args.concurrency} connections, best of {args.rounds}, "
          f"load average {os.getloadavg()[0]:.1f}; floor = the scheduler's HTTP edge with a "
          "constant answer, bare = aiohttp defaults"
          + (", numpy = the scheduler with its decision kernel off)" if KERNEL_BUILT else
             "; the C kernel is not built: the scheduler runs its numpy path)"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # the server process: KIND DECODERS PORT POLICY
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
