"""`netkv bench proxy`: what ``netkv proxy`` adds to a request, against engines that answer
at once, beside a constant pass-through aiohttp proxy (the floor) in the same run.

Three processes besides this one: an "instant" engine (prefill and decode ports; the prefill
answers with ``kv_transfer_params``, the decode with a fixed completion or ``--chunks`` SSE
chunks, all without waiting), the floor (one leg: forward the body to the decode, return its
answer) and ``netkv proxy`` (both legs, a decision with the ``netkv`` policy, booking and
release). The load generator (this process) sends requests open loop at ``--rate`` per
second; *added latency* is a percentile through a proxy minus the same percentile sent
straight to the decode. The highest rate per process is measured closed loop
(``--concurrency`` connections) and cross-checked by the proxy process's CPU time per request.
Streaming: the per-chunk cost is (through the proxy - direct) / chunks on a long stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
import psutil
from aiohttp import web

from netkv.localservers import free_port, wait_for_port

PROMPT = "Summarise the state of the network for the operator in one short paragraph. " * 6
MODEL = "bench/instant"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop requests/s")
    parser.add_argument("--seconds", type=float, default=6.0, help="open-loop duration")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="closed-loop connections for the highest rate")
    parser.add_argument("--closed-seconds", type=float, default=4.0)
    parser.add_argument("--chunks", type=int, default=256, help="SSE chunks per stream")
    parser.add_argument("--streams", type=int, default=200, help="streams measured")
    parser.add_argument("--out", type=Path, help="write the JSON result here")


# -- the servers (separate processes) ---------------------------------------------------------
def _instant(prefill_port: int, decode_port: int, chunks: int) -> None:
    completion = msgspec.json.encode({
        "id": "x", "object": "text_completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101}})
    prefilled = msgspec.json.encode({
        "id": "x", "object": "text_completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "length"}],
        "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                               "remote_block_ids": [1, 2, 3, 4, 5, 6, 7], "remote_engine_id":
                               "bench", "remote_request_id": "x", "remote_host": "127.0.0.1",
                               "remote_port": 5600, "tp_size": 1}})
    chunk = b'data: {"id":"x","object":"text_completion","created":0,"model":"m",' \
        b'"choices":[{"index":0,"text":" ok","logprobs":null,"finish_reason":null}]}\n\n'
    metrics = (b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
               b"vllm:kv_cache_usage_perc 0\n")

    async def completions(request: web.Request) -> web.StreamResponse:
        body = msgspec.json.decode(await request.read())
        if (body.get("kv_transfer_params") or {}).get("do_remote_decode"):
            return web.Response(body=prefilled, content_type="application/json")
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for _ in range(chunks):
                await resp.write(chunk)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.Response(body=completion, content_type="application/json")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=metrics if request.path == "/metrics" else b"")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", ok)
    app.router.add_get("/v1/models", models)
    _run_sites(app, [prefill_port, decode_port])


def _floor(port: int, decode_port: int) -> None:
    """The constant pass-through proxy: one leg, no decision."""
    target = f"http://127.0.0.1:{decode_port}/v1/completions"
    state: dict[str, aiohttp.ClientSession] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        async with state["http"].post(target, data=data, headers={
                "Content-Type": "application/json"}) as resp:
            if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                return web.Response(body=await resp.read(), content_type="application/json")
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def session(app: web.Application) -> Any:
        state["http"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await state["http"].close()

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    app.cleanup_ctx.append(session)
    _run_sites(app, [port])


def _run_sites(app: web.Application, ports: list[int]) -> None:
    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for p in ports:
            await web.TCPSite(runner, "127.0.0.1", p).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


# -- the load ---------------------------------------------------------------------------------
def _body(stream: bool) -> bytes:
    return msgspec.json.encode({"model": MODEL, "prompt": PROMPT, "max_tokens": 16,
                                "stream": stream})


async def _one(http: aiohttp.ClientSession, url: str, data: bytes) -> float:
    start = time.perf_counter()
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return time.perf_counter() - start


async def _open_loop(url: str, rate: float, seconds: float) -> np.ndarray[Any, Any]:
    data = _body(False)
    n = int(rate * seconds)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for _ in range(50):  # warm the connections
            await _one(http, url, data)
        t0 = time.perf_counter()

        async def at(i: int) -> float:
            await asyncio.sleep(max(t0 + i / rate - time.perf_counter(), 0.0))
            return await _one(http, url, data)

        out = await asyncio.gather(*(at(i) for i in range(n)))
    return np.array(out)


async def _closed_loop(url: str, concurrency: int, seconds: float,
                       pid: int | None) -> dict[str, float]:
    data = _body(False)
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


async def _streams(url: str, count: int) -> np.ndarray[Any, Any]:
    data = _body(True)
    async with aiohttp.ClientSession() as http:
        for _ in range(10):
            await _one(http, url, data)
        return np.array([await _one(http, url, data) for _ in range(count)])


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run(args: argparse.Namespace) -> int:
    if not (1 <= args.rate <= 20000 and 0 < args.seconds <= 120 and args.chunks >= 1):
        print("netkv bench proxy: --rate in 1..20000, --seconds in (0, 120]", file=sys.stderr)
        return 2
    pp, pd, pf, px = free_port(), free_port(), free_port(), free_port()
    me = "netkv.bench.proxy"
    procs = [_spawn("-m", me, "instant", str(pp), str(pd), str(args.chunks)),
             _spawn("-m", me, "floor", str(pf), str(pd))]
    try:
        asyncio.run(_wait([pp, pd, pf]))
        proxy = _spawn("-m", "netkv.cli", "proxy", "--port", str(px), "--prefill",
                       f"http://127.0.0.1:{pp}=prefill-host", "--decode",
                       f"http://127.0.0.1:{pd}=decode-host")
        procs.append(proxy)
        asyncio.run(_wait([px]))
        result = asyncio.run(_measure(args, {"direct": pd, "floor": pf, "netkv": px},
                                      {"floor": procs[1].pid, "netkv": proxy.pid}))
    finally:
        for p in procs:
            _stop(p)
    _print(result)
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
    url = {k: f"http://127.0.0.1:{p}/v1/completions" for k, p in ports.items()}
    lat = {k: await _open_loop(url[k], args.rate, args.seconds) for k in url}
    pct = {k: {"p50_ms": float(np.percentile(v, 50) * 1e3),
               "p99_ms": float(np.percentile(v, 99) * 1e3)} for k, v in lat.items()}
    for k in ("floor", "netkv"):
        pct[k]["added_p50_ms"] = pct[k]["p50_ms"] - pct["direct"]["p50_ms"]
        pct[k]["added_p99_ms"] = pct[k]["p99_ms"] - pct["direct"]["p99_ms"]
    closed = {k: await _closed_loop(url[k], args.concurrency, args.closed_seconds,
                                    pids.get(k)) for k in url}
    streams = {k: await _streams(url[k], args.streams) for k in url}
    per_chunk = {k: float((np.median(streams[k]) - np.median(streams["direct"]))
                          / args.chunks * 1e6) for k in ("floor", "netkv")}
    return {"rate": args.rate, "seconds": args.seconds, "chunks": args.chunks,
            "latency": pct, "closed_loop": closed, "stream_per_chunk_us": per_chunk,
            "stream_median_ms": {k: float(np.median(v) * 1e3) for k, v in streams.items()},
            "note": "loopback, one machine; the load generator shares the CPU"}


def _print(r: dict[str, Any]) -> None:
    lat, closed = r["latency"], r["closed_loop"]
    print(f"open loop at {r['rate']:g} req/s for {r['seconds']:g} s, non-streaming")
    print(f"{'path':<8}{'p50':>9}{'p99':>9}{'added p50':>11}{'added p99':>11}"
          f"{'max req/s':>11}{'CPU/req':>10}{'per chunk':>11}")
    for k in ("direct", "floor", "netkv"):
        added = (f"{lat[k]['added_p50_ms']:>9.2f}ms{lat[k]['added_p99_ms']:>9.2f}ms"
                 if k != "direct" else f"{'':>11}{'':>11}")
        cpu = closed[k]["cpu_us_per_request"]
        chunk = f"{r['stream_per_chunk_us'][k]:>9.1f}us" if k != "direct" else f"{'':>11}"
        print(f"{k:<8}{lat[k]['p50_ms']:>7.2f}ms{lat[k]['p99_ms']:>7.2f}ms{added}"
              f"{closed[k]['rate']:>11.0f}"
              f"{(f'{cpu:.0f}us' if not math.isnan(cpu) else '-'):>10}{chunk}")


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    with contextlib.suppress(KeyboardInterrupt):
        if kind == "instant":
            _instant(int(rest[0]), int(rest[1]), int(rest[2]))
        elif kind == "floor":
            _floor(int(rest[0]), int(rest[1]))
