"""The real peer routers (the ``peers`` extra) in front of recording engines on loopback:
what vllm-router and the SGLang router send to prefill and decode, driven by the official
``openai`` client, and that they start, become ready and stop like any testbed process.

The recording server answers as a vLLM OpenAI server in P/D mode does (the prefill's answer
carries ``kv_transfer_params``); it computes nothing. These tests pin down the protocol the
emulated engines must accept from each peer, and the reason the SGLang router cannot drive a
vLLM NixlConnector pull deployment (it never sends ``kv_transfer_params``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
from aiohttp import web

from netkv.localservers import free_port
from netkv.testbed.routers import (
    Pinning,
    RouterError,
    RouterProcess,
    RouterSpec,
    Worker,
    router_command,
    spawn_local,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
MODEL = "netkv/recorded"


def _need(name: str) -> None:
    if not (Path(sys.executable).parent / name).exists() and shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (pip install 'netkv[peers]'; `make venv` does)")


@dataclass
class Seen:
    role: str
    port: int
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Recorder:
    """Two prefill and two decode stand-ins on free loopback ports, one shared log."""

    seen: list[Seen] = field(default_factory=list)
    ports: dict[str, list[int]] = field(default_factory=lambda: {"prefill": [], "decode": []})

    def posts(self, role: str | None = None) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST" and role in (None, s.role)]

    def app(self, role: str) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            body = json.loads(raw) if raw else None
            port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
            self.seen.append(Seen(role, port, request.method, request.path,
                                  dict(request.headers), body))
            if request.path == "/health":
                return web.Response(text="")
            if request.path == "/metrics":
                return web.Response(text="vllm:num_requests_running 0\n")
            if request.path == "/v1/models":
                return web.json_response({"object": "list", "data": [
                    {"id": MODEL, "object": "model", "owned_by": "netkv"}]})
            if request.method != "POST" or not isinstance(body, dict):
                return web.json_response({"error": "not here"}, status=404)
            rid = request.headers.get("X-Request-Id", "none")
            chat = request.path.endswith("/chat/completions")
            if body.get("stream"):
                resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
                await resp.prepare(request)
                for i in range(3):
                    choice: dict[str, Any] = ({"index": 0, "delta": {"content": f"{role}{i}"}}
                                              if chat else {"index": 0, "text": f"{role}{i}"})
                    chunk = {"id": rid, "created": 0, "model": MODEL, "choices": [choice],
                             "object": "chat.completion.chunk" if chat else "text_completion"}
                    await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            text = f"{role}:{port}"
            answer: dict[str, Any] = {
                "id": rid, "created": 0, "model": MODEL,
                "object": "chat.completion" if chat else "text_completion",
                "choices": [{"index": 0, "finish_reason": "length",
                             **({"message": {"role": "assistant", "content": text}} if chat
                                else {"text": text})}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
            if role == "prefill" and body.get("kv_transfer_params"):
                answer["kv_transfer_params"] = {
                    "do_remote_prefill": True, "do_remote_decode": False,
                    "remote_block_ids": [7, 8], "remote_engine_id": f"engine-{port}",
                    "remote_request_id": rid, "remote_host": "127.0.0.1", "remote_port": port,
                    "tp_size": 1}
            return web.json_response(answer)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    runners = []
    try:
        for role in ("prefill", "prefill", "decode", "decode"):
            runner = web.AppRunner(rec.app(role), access_log=None)
            await runner.setup()
            runners.append(runner)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            await web.SockSite(runner, sock).start()
            rec.ports[role].append(sock.getsockname()[1])
        yield rec
    finally:
        for runner in runners:
            await runner.cleanup()


RouterFactory = Callable[[RouterSpec], Awaitable[RouterProcess]]


@pytest.fixture
async def start_router(recorder: Recorder, tmp_path: Path) -> AsyncIterator[RouterFactory]:
    """Factory: a real router process in front of the recorder, stopped after the test."""
    started: list[RouterProcess] = []

    async def start(spec: RouterSpec) -> RouterProcess:
        prefill = [Worker(f"http://127.0.0.1:{p}", f"h{i}", bootstrap_port=8998 + i)
                   for i, p in enumerate(recorder.ports["prefill"])]
        decode = [Worker(f"http://127.0.0.1:{p}", f"h{i + 2}")
                  for i, p in enumerate(recorder.ports["decode"])]
        command = router_command(spec, prefill, decode, host="127.0.0.1", port=free_port(),
                                 metrics_port=free_port())
        router = RouterProcess(spec, command, spawn_local,
                               tmp_path / f"{spec.kind}-{spec.policy}.log",
                               pinning=Pinning(cpus=(0,)), ready_timeout_s=30.0)
        started.append(router)
        await router.start()
        return router

    try:
        yield start
    finally:
        for router in started:
            await router.stop()


def _client(router: RouterProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0,
                              timeout=20.0)


async def test_vllm_router_speaks_the_nixl_pull_protocol(
        recorder: Recorder, start_router: RouterFactory) -> None:
    _need("vllm-router")
    router = await start_router(RouterSpec("vllm-router", "round_robin"))
    client = _client(router)
    try:
        done = await client.completions.create(model=MODEL, prompt="hello", max_tokens=5)
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=True, stream_options={"include_usage": True})
        chunks = [c.choices[0].delta.content async for c in stream if c.choices]
    finally:
        await client.close()
    assert done.choices[0].text.startswith("decode:"), done  # the decode's answer came back
    assert chunks == ["decode0", "decode1", "decode2"]
    # before routing, every worker's /health was checked
    assert {s.port for s in recorder.seen if s.path == "/health"} == {
        *recorder.ports["prefill"], *recorder.ports["decode"]}
    prefill, decode = recorder.posts("prefill"), recorder.posts("decode")
    assert len(prefill) == len(decode) == 2
    for p, d in zip(prefill, decode, strict=True):
        assert p.path == d.path
        assert p.body["max_tokens"] == 1 and p.body["stream"] is False
        assert "stream_options" not in p.body
        assert p.body["kv_transfer_params"] == {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}
        # the decode gets the prefill's kv_transfer_params verbatim, and the client's body
        params = d.body["kv_transfer_params"]
        assert params["remote_engine_id"] == f"engine-{p.port}"
        assert params["remote_block_ids"] == [7, 8] and params["do_remote_prefill"] is True
        assert p.headers["X-Request-ID"] == d.headers["X-Request-ID"] == \
            params["remote_request_id"]
        # the router names both ends in its own request id (P2pNccl-style)
        assert f"___prefill_addr_127.0.0.1:{p.port}___decode_addr_127.0.0.1:{d.port}_" in \
            p.headers["X-Request-ID"]
    assert decode[0].body["max_tokens"] == 5 and decode[0].body.get("stream") is not True
    assert decode[1].body["stream"] is True and decode[1].body["max_tokens"] == 4
    # round robin alternates both pools
    assert {p.port for p in prefill} == set(recorder.ports["prefill"])
    assert {d.port for d in decode} == set(recorder.ports["decode"])
    # it adds SGLang-style sampling fields: engines must ignore fields they do not know
    assert {"no_stop_trim", "skip_special_tokens"} <= set(prefill[0].body)


async def test_sglang_router_speaks_only_the_bootstrap_protocol(
        recorder: Recorder, start_router: RouterFactory) -> None:
    """Why the SGLang router cannot drive vLLM NixlConnector engines: the same body goes to
    both legs at once with bootstrap fields, and no kv_transfer_params ever."""
    _need("sglang-router")
    router = await start_router(RouterSpec("sglang-router", "round_robin"))
    client = _client(router)
    try:
        done = await client.completions.create(model=MODEL, prompt="hello", max_tokens=5,
                                               extra_headers={"X-Request-Id": "client-1"})
    finally:
        await client.close()
    assert done.choices[0].text.startswith("decode:")
    (p,), (d,) = recorder.posts("prefill"), recorder.posts("decode")
    assert p.body == d.body  # one body, both legs
    assert "kv_transfer_params" not in p.body
    assert p.body["max_tokens"] == 5  # no one-token prefill leg
    assert p.body["bootstrap_host"] == "127.0.0.1"
    assert p.body["bootstrap_port"] in (8998, 8999)  # the prefill's, as given on its flag
    assert isinstance(p.body["bootstrap_room"], int)
    assert p.headers["X-Request-ID"] == d.headers["X-Request-ID"] == "client-1"


async def test_router_stop_is_bounded_and_leaves_no_process(
        start_router: RouterFactory) -> None:
    _need("vllm-router")
    router = await start_router(RouterSpec("vllm-router", "power_of_two"))
    assert router.proc is not None
    pid = router.proc.pid
    assert psutil.Process(pid).cpu_affinity() == [0]  # pinned as asked
    assert router.cpu_seconds() >= 0.0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await router.stop()
    assert loop.time() - t0 < router.stop_timeout_s + 3.0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    await router.stop()  # idempotent


async def test_a_router_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    """Workers that do not exist: the peer waits for them, so readiness times out; the
    error names the router and quotes its log, and the process is gone afterwards."""
    _need("vllm-router")
    spec = RouterSpec("vllm-router", "round_robin")
    prefill = [Worker(f"http://127.0.0.1:{free_port()}", "h0")]
    decode = [Worker(f"http://127.0.0.1:{free_port()}", "h1")]
    command = router_command(spec, prefill, decode, host="127.0.0.1", port=free_port(),
                             metrics_port=free_port())
    router = RouterProcess(spec, command, spawn_local, tmp_path / "r.log",
                           pinning=Pinning(cpus=(0,)), ready_timeout_s=3.0)
    with pytest.raises(RouterError, match="vllm-router:round_robin not ready"):
        await router.start()
    assert router.proc is None
