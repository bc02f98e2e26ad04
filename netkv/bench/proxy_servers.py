"""The servers of `netkv bench proxy`, each run as its own process
(``python -m netkv.bench.proxy_servers instant|floor ... [--loop auto|uvloop|asyncio]``): the
"instant" engine (prefill and decode ports; the prefill answers with ``kv_transfer_params``,
the decode with a fixed completion or ``max_tokens`` SSE chunks, all without waiting) and the
floor, a constant pass-through aiohttp proxy (one leg: forward the body to the decode, return
its answer). Both run on the event loop given (the bench runs every process on one loop)."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from netkv import eventloop
from netkv.eventloop import LoopChoice
from netkv.signals import stop_on_signals

MODEL = "bench/instant"


def _instant(prefill_port: int, decode_port: int, chunks: int, loop: LoopChoice) -> None:
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
        if body.get("stream"):  # max_tokens chunks (the bench sends long and short streams)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for _ in range(min(int(body.get("max_tokens") or chunks), 1 << 16)):
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
    _run_sites(app, [prefill_port, decode_port], loop)


def _floor(port: int, decode_port: int, loop: LoopChoice) -> None:
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
    _run_sites(app, [port], loop)


def _run_sites(app: web.Application, ports: list[int], loop: LoopChoice) -> None:
    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for p in ports:
            await web.TCPSite(runner, "127.0.0.1", p).start()
        with stop_on_signals() as stop:
            await stop.wait()
        await runner.cleanup()

    eventloop.run(main(), loop)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("instant", "floor"))
    parser.add_argument("ports", type=int, nargs="+")
    eventloop.add_loop_argument(parser, default="auto", what="the server")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        if args.kind == "instant":
            _instant(args.ports[0], args.ports[1], args.ports[2], args.loop)
        else:
            _floor(args.ports[0], args.ports[1], args.loop)
