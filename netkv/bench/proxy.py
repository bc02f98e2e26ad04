"""`netkv bench proxy`: what ``netkv proxy`` adds to a request, against engines that answer
at once, beside a constant pass-through aiohttp proxy (the floor) in the same run.

Three processes besides this one: an "instant" engine (prefill and decode ports; the prefill
answers with ``kv_transfer_params``, the decode with a fixed completion or ``max_tokens`` SSE
chunks, all without waiting), the floor (one leg: forward the body to the decode, return its
answer) and ``netkv proxy`` (both legs, a decision with the ``netkv`` policy, booking and
release). The load generator (this process) sends requests open loop at ``--rate`` per
second; *added latency* is a percentile through a proxy minus the same percentile sent
straight to the decode, at the same rate. A fourth path, ``direct2``, sends both legs of the
pull flow from the client itself (prefill, then decode with its ``kv_transfer_params``): netkv
minus direct2 is what the proxy adds beyond the second engine round trip any pull flow
needs. The highest rate per process is measured closed loop (``--concurrency`` connections)
and cross-checked by the proxy process's CPU time per request. Streaming: the per-chunk cost
is the slope over chunk counts (streams of ``--chunks`` and of ``--chunks // 16`` chunks, sent
in alternation), through the proxy minus straight, so the request's fixed cost does not count
as chunk cost; the older figure, (through the proxy - direct) / chunks on the long stream, is
reported beside it. ``--prompt-tokens N`` sends prompts of N token ids instead of the short
text prompt (the proxy's hashing, prefix index and body handling grow with the prompt). During
netkv's rounds the proxy's own stalls are read from its /metrics (``netkv_proxy.stalls``: how
late a 10 ms timer woke, GC pauses), to tell a stall in the proxy from time lost elsewhere.

Fairness (the same treatment for the direct path, the floor and netkv):

* The event loop (``--loop``, default ``auto``: uvloop where installed): every process (the
  engine, the floor, the proxy, the load generator) runs on the same one, printed and
  recorded as ``loop`` in the JSON; the floor is an aiohttp proxy on that loop too.

* The front: ``--front`` (default ``h1``) is passed to ``netkv proxy`` (its client-facing
  HTTP server, :mod:`netkv.http.h1` or aiohttp's) and printed; the floor is a constant
  pass-through aiohttp proxy whichever the proxy's front is.

* CPUs (``--pin auto``, with two or more CPUs): the proxy under test (floor or netkv, one at a
  time is loaded) runs alone on the last CPU this process may use; the engine and the load
  generator share the others. Without pinning the three compete for the same cores and the
  scheduler's choices show up as proxy latency. ``--pin off`` leaves placement to the OS.
* Time: the open loop runs in ``--rounds`` rounds; each round measures every path in turn
  (the order rotates), so a burst of other work on the machine falls on all paths alike.
* The generator: requests are sent by a dispatcher at their scheduled times (not thousands of
  sleeping tasks created up front), the generator's garbage collector is off while it
  measures, and how late it sent (``generator_lag_p99_ms``) is reported: a late generator
  would make every path look slow, and says the machine, not the proxy, was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
import psutil

from netkv import eventloop
from netkv.bench.proxy_report import print_result
from netkv.bench.proxy_servers import MODEL
from netkv.eventloop import add_loop_argument
from netkv.localservers import free_port, wait_for_port
from netkv.tasks import stop_popen

PROMPT = "Summarise the state of the network for the operator in one short paragraph. " * 6
JSON = {"Content-Type": "application/json"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop requests/s")
    parser.add_argument("--seconds", type=float, default=6.0, help="open-loop duration")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="closed-loop connections for the highest rate")
    parser.add_argument("--closed-seconds", type=float, default=4.0)
    parser.add_argument("--chunks", type=int, default=256, help="SSE chunks per stream")
    parser.add_argument("--streams", type=int, default=200, help="streams measured")
    parser.add_argument("--rounds", type=int, default=4,
                        help="open-loop rounds; each measures every path in turn")
    parser.add_argument("--pin", choices=("auto", "off"), default="auto",
                        help="auto: the proxy under test alone on one CPU, the engine and "
                        "the load generator on the others (needs 2+ CPUs)")
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="send prompts of this many token ids (0: a ~110-token text "
                        "prompt); the proxy hashes and indexes every block of them")
    add_loop_argument(parser, default="auto", what="every process of the bench (engine, "
                      "floor, proxy, load generator)")
    parser.add_argument("--front", choices=("h1", "aiohttp"), default="h1",
                        help="netkv proxy's client-facing HTTP server (its --front); the "
                        "floor stays a constant pass-through aiohttp proxy")
    parser.add_argument("--out", type=Path, help="write the JSON result here")


# -- the load ---------------------------------------------------------------------------------
Prompt = str | list[int]


def prompt_of(tokens: int) -> Prompt:
    """``--prompt-tokens``: 0 for the short text prompt, else that many token ids (distinct
    per position, so every block hash is a new one for the prefix index)."""
    return PROMPT if tokens <= 0 else [i % 32_000 for i in range(tokens)]


def _body(stream: bool, tokens: int = 16, prompt: Prompt = PROMPT) -> bytes:
    return msgspec.json.encode({"model": MODEL, "prompt": prompt, "max_tokens": tokens,
                                "stream": stream})


async def _one(http: aiohttp.ClientSession, url: str, data: bytes) -> float:
    start = time.perf_counter()
    async with http.post(url, data=data, headers=JSON) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return time.perf_counter() - start


Send = Callable[[aiohttp.ClientSession], Awaitable[float]]


def one_leg(url: str, prompt: Prompt = PROMPT) -> Send:
    """One request to ``url`` (straight to the decode, or through a proxy)."""
    data = _body(False, prompt=prompt)
    return lambda http: _one(http, url, data)


def both_legs(prefill_url: str, decode_url: str, prompt: Prompt = PROMPT) -> Send:
    """What a client doing the pull flow itself would send: the prefill leg, then the decode
    leg with the prefill's ``kv_transfer_params`` (the engine time both legs take, without
    any proxy)."""
    body = msgspec.json.decode(_body(False, prompt=prompt))
    pdata = msgspec.json.encode({**body, "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "do_remote_prefill": False}})

    async def send(http: aiohttp.ClientSession) -> float:
        start = time.perf_counter()
        async with http.post(prefill_url, data=pdata, headers=JSON) as r:
            answer = msgspec.json.decode(await r.read())
        ddata = msgspec.json.encode({**body, "kv_transfer_params":
                                     answer["kv_transfer_params"]})
        async with http.post(decode_url, data=ddata, headers=JSON) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"{decode_url}: HTTP {r.status}")
        return time.perf_counter() - start

    return send


async def _open_loop(http: aiohttp.ClientSession, send: Send, rate: float, seconds: float
                     ) -> tuple[list[float], list[float]]:
    """Send ``rate * seconds`` requests at their scheduled times; (latencies, lateness)."""
    n = int(rate * seconds)
    latencies: list[float] = []
    late: list[float] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        latencies.append(await send(http))

    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        late.append(max(time.perf_counter() - due, 0.0))
        task = asyncio.ensure_future(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return latencies, late


STALL_LINE = re.compile(r'^netkv_proxy_(loop_lag|gc_pause)_seconds_(bucket|count|sum)'
                        r'\{?(?:generation="\d",?)?(?:le="([^"]+)")?\}? (\S+)$', re.M)


async def stall_counters(http: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    """The proxy's own stall counters (netkv_proxy.stalls) from its /metrics page: timer
    wake-ups (``ticks``), those late by more than 3 ms, GC pauses (all generations), those
    over 1 ms, and the pauses' total seconds."""
    async with http.get(metrics_url) as r:
        text = await r.text()
    out = dict.fromkeys(("ticks", "late_3ms", "gc", "gc_1ms", "gc_s"), 0.0)
    within_3ms = within_1ms = 0.0
    for kind, part, le, value in STALL_LINE.findall(text):
        v = float(value)
        if kind == "loop_lag":
            if part == "count":
                out["ticks"] += v
            elif part == "bucket" and le == "0.003":
                within_3ms += v
        elif part == "count":
            out["gc"] += v
        elif part == "sum":
            out["gc_s"] += v
        elif part == "bucket" and le == "0.001":
            within_1ms += v
    out["late_3ms"] = out["ticks"] - within_3ms
    out["gc_1ms"] = out["gc"] - within_1ms
    return out


async def _rounds(paths: dict[str, Send], rate: float, seconds: float, rounds: int,
                  pids: dict[str, int], *, stall_urls: dict[str, str] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """The open loop, interleaved: each round measures every path in turn (rotated).
    For a path in ``stall_urls`` (a proxy's /metrics) the proxy's own stalls during its
    rounds are summed."""
    names = list(paths)
    stall_urls = stall_urls or {}
    stalls: dict[str, dict[str, float]] = {}
    lat: dict[str, list[float]] = {k: [] for k in names}
    late: dict[str, list[float]] = {k: [] for k in names}
    per_round: dict[str, list[float]] = {k: [] for k in names}
    cpu = dict.fromkeys(names, 0.0)
    procs = {k: psutil.Process(pid) for k, pid in pids.items()}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for k in names:  # warm a pool of connections (and the proxies' caches) on each path
            for _ in range(8):
                await asyncio.gather(*(paths[k](http) for _ in range(16)))
        gc.collect()
        gc.freeze()
        gc.disable()  # no collector pause in the generator while it measures
        try:
            for r in range(rounds):
                for k in names[r % len(names):] + names[:r % len(names)]:
                    proc = procs.get(k)
                    cpu0 = sum(proc.cpu_times()[:2]) if proc else 0.0
                    s0 = await stall_counters(http, stall_urls[k]) if k in stall_urls else {}
                    got, lag = await _open_loop(http, paths[k], rate, seconds / rounds)
                    if proc:
                        cpu[k] += sum(proc.cpu_times()[:2]) - cpu0
                    if k in stall_urls:
                        s1 = await stall_counters(http, stall_urls[k])
                        acc = stalls.setdefault(k, dict.fromkeys(s1, 0.0))
                        for name, value in s1.items():
                            acc[name] += value - s0[name]
                    lat[k] += got
                    late[k] += lag
                    per_round[k].append(float(np.percentile(got, 99) * 1e3))
        finally:
            gc.enable()
            gc.unfreeze()
    out: dict[str, dict[str, Any]] = {}
    for k in names:
        v = np.array(lat[k])
        out[k] = {"p50_ms": float(np.percentile(v, 50) * 1e3),
                  "p99_ms": float(np.percentile(v, 99) * 1e3),
                  "p99_ms_by_round": per_round[k], "requests": len(v),
                  "generator_lag_p99_ms": float(np.percentile(late[k], 99) * 1e3)}
        if k in procs:
            out[k]["cpu_us_per_request"] = cpu[k] / len(v) * 1e6
        if k in stalls:
            out[k]["proxy_stalls"] = stalls[k]
    return out


async def _closed_loop(url: str, concurrency: int, seconds: float,
                       pid: int | None, *, prompt: Prompt = PROMPT) -> dict[str, float]:
    data = _body(False, prompt=prompt)
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for _ in range(20):
            await _one(http, url, data)
        proc = psutil.Process(pid) if pid else None
        cpu0 = sum(proc.cpu_times()[:2]) if proc else 0.0
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await _one(http, url, data)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        cpu = (sum(proc.cpu_times()[:2]) - cpu0) if proc else float("nan")
    return {"rate": done / elapsed, "cpu_us_per_request": cpu / max(done, 1) * 1e6}


async def _streams(url: str, count: int, long: int, short: int, *, prompt: Prompt = PROMPT
                   ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Stream times of ``long``- and ``short``-chunk streams, sent in alternation."""
    data = {long: _body(True, long, prompt), short: _body(True, short, prompt)}
    times: dict[int, list[float]] = {long: [], short: []}
    async with aiohttp.ClientSession() as http:
        for _ in range(10):
            await _one(http, url, data[long])
        for _ in range(count):
            for n in (long, short):
                times[n].append(await _one(http, url, data[n]))
    return np.array(times[long]), np.array(times[short])


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)



def placement(pin: str) -> tuple[set[int], set[int]] | None:
    """(CPUs of the proxies under test, CPUs of the engine and the generator), or None when
    not pinning (``--pin off``, fewer than two CPUs, or no ``sched_setaffinity``)."""
    if pin == "off" or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


def run(args: argparse.Namespace) -> int:
    if not (1 <= args.rate <= 20000 and 0 < args.seconds <= 120 and args.chunks >= 1
            and 1 <= args.rounds <= 100 and 0 <= args.prompt_tokens <= 1_000_000):
        print("netkv bench proxy: --rate in 1..20000, --seconds in (0, 120], --rounds in "
              "1..100, --prompt-tokens in 0..1000000", file=sys.stderr)
        return 2
    try:
        loop = eventloop.resolve(args.loop, "--loop")
    except ValueError as exc:
        print(f"netkv bench proxy: {exc}", file=sys.stderr)
        return 2
    pp, pd, pf, px = free_port(), free_port(), free_port(), free_port()
    me = "netkv.bench.proxy_servers"
    cpus = placement(args.pin)
    before = os.sched_getaffinity(0) if cpus else None
    procs = [_spawn("-m", me, "instant", str(pp), str(pd), str(args.chunks), "--loop", loop),
             _spawn("-m", me, "floor", str(pf), str(pd), "--loop", loop)]
    try:
        eventloop.run(_wait([pp, pd, pf]), loop)
        proxy = _spawn("-m", "netkv.cli", "proxy", "--port", str(px), "--prefill",
                       f"http://127.0.0.1:{pp}=prefill-host", "--decode",
                       f"http://127.0.0.1:{pd}=decode-host", "--loop", loop,
                       "--front", args.front)
        procs.append(proxy)
        if cpus is not None:
            tested, rest = cpus
            for p in (procs[1], proxy):
                os.sched_setaffinity(p.pid, tested)
            os.sched_setaffinity(procs[0].pid, rest)
            os.sched_setaffinity(0, rest)
        eventloop.run(_wait([px]), loop)
        result = eventloop.run(_measure(args, {"direct": pd, "floor": pf, "netkv": px,
                                               "prefill": pp},
                                        {"floor": procs[1].pid, "netkv": proxy.pid}), loop)
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)
        for p in procs:
            stop_popen(p, 5.0)
    result["pinned"] = None if cpus is None else {
        "proxy_under_test": sorted(cpus[0]), "engine_and_generator": sorted(cpus[1])}
    result["load_average"] = os.getloadavg()
    result["loop"] = loop  # every process: the engine, the floor, the proxy, the generator
    result["front"] = args.front  # netkv proxy's front (the floor is aiohttp's either way)
    print_result(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


async def _wait(ports: list[int]) -> None:
    for p in ports:
        await wait_for_port("127.0.0.1", p, timeout_s=30.0)
    await asyncio.sleep(1.5)  # the proxy's first health round


async def _measure(args: argparse.Namespace, ports: dict[str, int],
                   pids: dict[str, int]) -> dict[str, Any]:
    url = {k: f"http://127.0.0.1:{p}/v1/completions" for k, p in ports.items()
           if k != "prefill"}
    prompt = prompt_of(args.prompt_tokens)
    paths = {k: one_leg(u, prompt) for k, u in url.items()}
    paths["direct2"] = both_legs(f"http://127.0.0.1:{ports['prefill']}/v1/completions",
                                 url["direct"])
    pct = await _rounds(paths, args.rate, args.seconds, args.rounds, pids,
                        stall_urls={"netkv": f"http://127.0.0.1:{ports['netkv']}/metrics"})
    for k in ("floor", "netkv"):
        pct[k]["added_p50_ms"] = pct[k]["p50_ms"] - pct["direct"]["p50_ms"]
        pct[k]["added_p99_ms"] = pct[k]["p99_ms"] - pct["direct"]["p99_ms"]
    # netkv's two legs against the same two legs sent by the client itself: the proxy's own
    # part, without the second engine round trip the pull flow needs with or without a proxy
    pct["netkv"]["added_p50_vs_both_legs_ms"] = pct["netkv"]["p50_ms"] - pct["direct2"]["p50_ms"]
    pct["netkv"]["added_p99_vs_both_legs_ms"] = pct["netkv"]["p99_ms"] - pct["direct2"]["p99_ms"]
    closed = {k: await _closed_loop(url[k], args.concurrency, args.closed_seconds,
                                    pids.get(k), prompt=prompt) for k in url}
    long, short = args.chunks, max(1, args.chunks // 16)
    streams = {k: await _streams(url[k], args.streams, long, short, prompt=prompt)
               for k in url}
    med = {k: (float(np.median(a)), float(np.median(b))) for k, (a, b) in streams.items()}
    # Per chunk: the slope over chunk counts, through the proxy minus straight; the request's
    # fixed cost (both legs, the decision) cancels out. The older figure, (through the proxy
    # - straight) / chunks on the long stream, carries that fixed cost spread over the chunks.
    span = max(long - short, 1)
    per_chunk = {k: ((med[k][0] - med[k][1]) - (med["direct"][0] - med["direct"][1]))
                 / span * 1e6 for k in ("floor", "netkv")}
    per_chunk_with_fixed = {k: (med[k][0] - med["direct"][0]) / long * 1e6
                            for k in ("floor", "netkv")}
    return {"rate": args.rate, "seconds": args.seconds, "rounds": args.rounds,
            "prompt_tokens": args.prompt_tokens or None,
            "chunks": args.chunks, "latency": pct, "closed_loop": closed,
            "stream_per_chunk_us": per_chunk,
            "stream_per_chunk_us_with_fixed_cost": per_chunk_with_fixed,
            "stream_chunks": {"long": long, "short": short},
            "stream_median_ms": {k: {"long": v[0] * 1e3, "short": v[1] * 1e3}
                                 for k, v in med.items()},
            "note": "loopback, one machine"}
