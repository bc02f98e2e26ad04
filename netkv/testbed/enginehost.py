"""One GPU host's emulated engines as a service, for the compose testbed.

``netkv testbed engine --host h000 --topology FILE --scheduler URL`` runs every instance the
topology places on ``h000``: decode engines listen for KV streams on ``kv_port + k``, and
``POST /v1/generate`` on the HTTP port runs a request through one of the host's prefill
instances (modelled prefill, decision by the scheduler, real KV bytes to the chosen decode
host). The answer carries the request's timestamps on the host's monotonic clock, which all
containers on one kernel share, so the workload can compute TTFT across containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from netkv.core.topology import Topology
from netkv.errors import InputError
from netkv.fields import from_mapping
from netkv.testbed.engines import (
    DecodeEngine,
    EngineModel,
    PrefillEngine,
    RemoteDecoder,
    Request,
)
from netkv.testbed.selection import HttpSelector


@dataclass(frozen=True, slots=True)
class GenerateBody:
    """``POST /v1/generate``: one request for one of this host's prefill instances."""

    request_id: str
    prefill: str
    prompt_tokens: int = 1
    output_tokens: int = 0
    block_hashes: tuple[int, ...] = ()
    policy: str = "netkv"

    def __post_init__(self) -> None:
        if not 0 < self.prompt_tokens <= 2_000_000:
            raise InputError("prompt_tokens", "must be in 1..2000000")
        if not 0 <= self.output_tokens <= 1_000_000:
            raise InputError("output_tokens", "must be in 0..1000000")


@dataclass(frozen=True, slots=True)
class EngineHostSettings:
    host: str
    scheduler_url: str
    http_port: int = 9000
    kv_port: int = 9100
    bind: str = "0.0.0.0"  # a container's own interfaces
    bytes_per_token: float = 33.0
    token: str | None = None
    request_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("http_port", "kv_port"):
            if not 1 <= getattr(self, name) <= 65000:
                raise InputError(f"--{name.replace('_', '-')}", "must be in 1..65000")


def kv_endpoints(topology: Topology, kv_port: int) -> dict[str, RemoteDecoder]:
    """Every decode instance's KV address: its host's address, ``kv_port + k`` for the
    host's k-th decode instance."""
    out: dict[str, RemoteDecoder] = {}
    per_host: dict[str, int] = {}
    for inst in topology.instances_with_role("decode"):
        host = topology.hosts[topology.host_id(inst.host)]
        if not host.address:
            raise InputError(f"hosts.{host.name}.address", "the compose topology needs "
                             "every host's address")
        k = per_host.get(inst.host, 0)
        per_host[inst.host] = k + 1
        out[inst.name] = RemoteDecoder(host.address, kv_port + k)
    return out


async def serve(settings: EngineHostSettings, topology: Topology,
                stop: asyncio.Event) -> None:
    """Run the host's engines until ``stop`` is set."""
    model = EngineModel(bytes_per_token=settings.bytes_per_token)
    clock = time.monotonic
    me = topology.hosts[topology.host_id(settings.host)]
    targets = kv_endpoints(topology, settings.kv_port)
    async with HttpSelector(settings.scheduler_url, settings.token) as selector:
        async def done(request_id: str, decode: str) -> None:
            with contextlib.suppress(Exception):
                await selector.release(request_id, decode)

        decoders: list[DecodeEngine] = []
        for inst in topology.instances_with_role("decode"):
            if inst.host == me.name:
                engine = DecodeEngine(inst.name, None, settings.bind, model=model, clock=clock,
                                      on_done=done)
                await engine.start(targets[inst.name].port)
                decoders.append(engine)
        prefills = {i.name: PrefillEngine(i.name, None, model, clock)
                    for i in topology.instances_with_role("prefill") if i.host == me.name}

        async def generate(request: web.Request) -> web.Response:
            try:
                raw: Any = await request.json()
                body = from_mapping(GenerateBody, raw, "body")
                engine = prefills.get(body.prefill)
                if engine is None:
                    raise InputError("body.prefill", f"{body.prefill!r} is not a prefill "
                                     f"instance on {me.name}")
            except InputError as exc:
                return web.json_response({"error": exc.message, "field": exc.where}, status=400)
            except ValueError:
                return web.json_response({"error": "body is not JSON"}, status=400)
            req = Request(body.request_id, 0.0, body.prompt_tokens, body.output_tokens,
                          body.block_hashes)
            outcome = await engine.serve(req, body.policy, selector, targets,
                                         settings.request_timeout_s)
            return web.json_response(outcome.as_dict())

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok", "host": me.name,
                                      "prefill": sorted(prefills),
                                      "decode": [d.name for d in decoders]})

        async def lifespan(app: web.Application) -> AsyncIterator[None]:
            yield
            for d in decoders:
                await d.stop()

        app = web.Application()
        app.router.add_post("/v1/generate", generate)
        app.router.add_get("/healthz", healthz)
        app.cleanup_ctx.append(lifespan)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=3.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.bind, settings.http_port).start()
            print(f"engine host {me.name}: prefill {sorted(prefills)}, decode "
                  f"{[d.name for d in decoders]}, http :{settings.http_port}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()


def run_forever(settings: EngineHostSettings, topology: Topology) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, topology, stop)

    asyncio.run(main())
    return 0
