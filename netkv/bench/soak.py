"""`netkv bench soak`: the whole mesh under a steady load for a given time; RSS and log volume.

Runs ``netkv up`` (Redis, Mosquitto, one agent per host, the oracle, the scheduler, each its
own process, logs at their default level: info) in a work directory, and from this process a
steady open-loop load on the scheduler: ``--rate`` ``POST /v1/select`` per second, each with
fresh prefix block hashes (so the prefix index fills to its bound) and a ``POST /v1/release``
after ``--hold`` seconds. Every ``--sample`` seconds it records the RSS of every process of
the mesh and the bytes each one has logged, plus the scheduler's own gauges (prefix blocks,
open bookings). The JSON (``--out``) holds every sample; the table printed at the end gives,
per process, RSS at the end of the warm-up and at the end, the growth after warm-up, and the
log volume per hour.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from netkv.core.prefix_cache import BLOCK_TOKENS
from netkv.localservers import free_port, wait_for_port


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=1800.0,
                        help="seconds of steady load (default 1800 = 30 min)")
    parser.add_argument("--warmup", type=float, default=300.0,
                        help="seconds counted as warm-up (RSS growth is measured after it)")
    parser.add_argument("--rate", type=float, default=20.0, help="selects per second")
    parser.add_argument("--hold", type=float, default=2.0,
                        help="seconds between a select and its release")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument("--workdir", type=Path,
                        help="keep the mesh's config and logs here (default: a temporary dir)")


def _name(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except (psutil.Error, OSError):
        return f"pid {proc.pid}"
    if "netkv.cli" in cmd:
        i = cmd.index("netkv.cli")
        rest = cmd[i + 1:]
        if rest[:1] == ["agent"] and "--agent-id" in rest:
            return f"agent {rest[rest.index('--agent-id') + 1]}"
        return rest[0] if rest else "netkv"
    return Path(cmd[0]).name.split()[0] if cmd else f"pid {proc.pid}"


def _rss(root: psutil.Process) -> dict[str, float]:
    """MiB per process of the mesh (the `netkv up` parent included)."""
    out: dict[str, float] = {}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        with contextlib.suppress(psutil.Error):
            name = "up" if p.pid == root.pid else _name(p)
            out[name] = round(p.memory_info().rss / 2**20, 2)
    return out


def _logs(workdir: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_size for p in sorted(workdir.glob("*.log"))}


async def _gauges(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    want = ("netkv_prefix_blocks", "netkv_open_reservations", "netkv_map_version",
            "netkv_map_stale")
    out: dict[str, float] = {}
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with asyncio.timeout(5), http.get(f"{base}/metrics") as resp:
            for line in (await resp.text()).splitlines():
                name, _, value = line.partition(" ")
                if name in want:
                    out[name] = float(value)
    return out


async def _load(base: str, args: argparse.Namespace, prefills: list[str], stop: asyncio.Event,
                counts: dict[str, int]) -> None:
    """Open-loop selects at ``--rate``; each released ``--hold`` s later."""
    rng = random.Random(7)
    pending: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession() as http:
        async def one(i: int) -> None:
            tokens = rng.randint(500, 16000)
            hashes = [0] + [10**9 + i * 64 + k for k in range(-(-tokens // BLOCK_TOKENS) - 1)]
            rid = f"soak-{i}"
            try:
                async with asyncio.timeout(10):
                    async with http.post(f"{base}/v1/select", json={
                            "request_id": rid, "prefill": rng.choice(prefills),
                            "prompt_tokens": tokens, "block_hashes": hashes}) as resp:
                        await resp.read()
                        counts["ok" if resp.status == 200 else f"http {resp.status}"] = \
                            counts.get("ok" if resp.status == 200 else f"http {resp.status}",
                                       0) + 1
                    await asyncio.sleep(args.hold)
                    async with http.post(f"{base}/v1/release",
                                         json={"request_id": rid}) as resp:
                        await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1

        start = time.monotonic()
        i = 0
        while not stop.is_set():
            due = start + i / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
                continue
            task = asyncio.create_task(one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        await asyncio.gather(*pending, return_exceptions=True)


async def _soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = free_port()
    env = {k: v for k, v in args.environ.items() if not k.startswith("NETKV_")}
    with (workdir / "up.out").open("wb") as out:
        up = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "netkv.cli", "up", "--workdir", str(workdir),
            "--scheduler-port", str(port), "--run-for", str(args.duration + 120),
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out,
            stderr=asyncio.subprocess.STDOUT)
    root = psutil.Process(up.pid)
    base = f"http://127.0.0.1:{port}"
    samples: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    try:
        await wait_for_port("127.0.0.1", port, 120.0)
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(10), http.get(f"{base}/v1/instances") as resp:
                listing = await resp.json()
            prefills = [i["name"] for i in listing["instances"] if i["role"] == "prefill"]
            stop = asyncio.Event()
            load = asyncio.create_task(_load(base, args, prefills, stop, counts))
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < args.duration:
                    if load.done() or up.returncode is not None:
                        break
                    samples.append({"t_s": round(time.monotonic() - t0, 1),
                                    "rss_mib": _rss(root), "log_bytes": _logs(workdir),
                                    "gauges": await _gauges(http, base),
                                    "requests": dict(counts)})
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(args.sample):
                            await asyncio.shield(load)
            finally:
                stop.set()
                await asyncio.gather(load, return_exceptions=True)
    finally:
        with contextlib.suppress(ProcessLookupError):
            up.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(30):
                await up.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                up.kill()
            await up.wait()
    return {"duration_s": args.duration, "warmup_s": args.warmup, "rate": args.rate,
            "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "requests": counts, "samples": samples}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Per process: RSS after warm-up and at the end, growth, log MB/hour."""
    samples = result["samples"]
    if not samples:
        return {}
    warm = next((s for s in samples if s["t_s"] >= result["warmup_s"]), samples[-1])
    last = samples[-1]
    span_h = max(last["t_s"] - samples[0]["t_s"], 1.0) / 3600
    out: dict[str, Any] = {}
    for name in sorted(last["rss_mib"]):
        peak = max(s["rss_mib"].get(name, 0.0) for s in samples if s["t_s"] >= warm["t_s"])
        log_name = {"scheduler": "scheduler", "oracle": "oracle"}.get(
            name, name.replace("agent ", "agent-"))
        logged = last["log_bytes"].get(log_name, 0) - samples[0]["log_bytes"].get(log_name, 0)
        out[name] = {"rss_warm_mib": warm["rss_mib"].get(name), "rss_end_mib":
                     last["rss_mib"][name], "rss_peak_after_warmup_mib": peak,
                     "growth_after_warmup_mib": round(
                         last["rss_mib"][name] - warm["rss_mib"].get(name, 0.0), 2),
                     "log_mb_per_hour": round(logged / 1e6 / span_h, 4)
                     if log_name in last["log_bytes"] else None}
    total = sum(last["log_bytes"].values()) - sum(samples[0]["log_bytes"].values())
    out["all logs"] = {"log_mb_per_hour": round(total / 1e6 / span_h, 4)}
    return out


def print_table(summary: dict[str, Any], result: dict[str, Any]) -> None:
    print(f"{'process':<14} {'RSS warm':>9} {'RSS end':>9} {'growth':>8} {'peak':>8} "
          f"{'log MB/h':>9}")
    def cell(row: dict[str, Any], key: str, width: int) -> str:
        value = row.get(key)
        return f"{value:>{width}.2f}" if isinstance(value, int | float) else " " * width
    for name, row in summary.items():
        print(f"{name:<14} {cell(row, 'rss_warm_mib', 9)} {cell(row, 'rss_end_mib', 9)} "
              f"{cell(row, 'growth_after_warmup_mib', 8)} "
              f"{cell(row, 'rss_peak_after_warmup_mib', 8)} {cell(row, 'log_mb_per_hour', 9)}")
    last = result["samples"][-1] if result["samples"] else {}
    print(f"(MiB; {result['duration_s']:.0f} s at {result['rate']:g} selects/s, warm-up "
          f"{result['warmup_s']:.0f} s; requests {result['requests']}; prefix blocks at the "
          f"end {last.get('gauges', {}).get('netkv_prefix_blocks')}; load average "
          f"{result['load_average_1m']})")


def run(args: argparse.Namespace) -> int:
    if min(args.duration, args.rate, args.sample) <= 0:
        print("netkv bench soak: --duration, --rate and --sample must be > 0", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="netkv-soak-")))
        workdir.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(_soak(args, workdir))
    result["summary"] = summarise(result)
    print_table(result["summary"], result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0
