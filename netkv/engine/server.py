"""One emulated engine instance: vLLM's OpenAI surface over modelled compute.

Endpoints (as ``vllm serve`` has them): ``POST /v1/completions``, ``POST /v1/chat/completions``
(SSE when ``stream`` is true), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. The
request id is the ``X-Request-Id`` header when given (vLLM's ``--enable-request-id-headers``)
and is echoed back. ``GET /netkv/state`` reports open leases and connections (for leak
checks); with ``test_hooks`` on, ``POST /netkv/faults`` makes the engine fail on purpose and
``GET /netkv/requests`` returns the last bodies received (tests check the two-leg flow).

How a request is served depends on what it carries:

* ``kv_transfer_params.do_remote_decode``: the prefill leg. Modelled prefill (FIFO, cached
  prefix blocks skipped), one token, and the answer's ``kv_transfer_params`` say where the KV
  waits (``remote_host:remote_port`` = this engine's side channel) for ``lease_s``.
* ``kv_transfer_params.do_remote_prefill``: the decode leg. The KV blocks this engine lacks
  are read from the prefill's side channel, then tokens are generated.
* ``bootstrap_room`` (SGLang): on a prefill, compute and hand the KV to the decode that
  registers for the room; on a decode, register at ``bootstrap_host:bootstrap_port`` and
  receive the KV, then generate.
* none of these: both phases here (an aggregated engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
import structlog
from aiohttp import web
from prometheus_client import generate_latest

from netkv.contracts.openai import (
    BodyError,
    ModelCard,
    ModelList,
    decode_body,
    now_s,
)
from netkv.core.prefix_cache import PrefixCache
from netkv.engine import kvchannel
from netkv.engine.metrics import Metrics
from netkv.engine.settings import EngineSettings, Faults
from netkv.engine.wire import Prepared, answer, prepare, stream
from netkv.http.openai_errors import openai_error as _error
from netkv.prompts import (
    TokenCounter,
    block_hashes,
    tokenizer_from,
)
from netkv.supervisor import Supervisor

log = structlog.get_logger(__name__)

class Engine:
    """The engine's state and HTTP app; ``async with Engine(settings)`` serves it."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.model = settings.model
        self.metrics = Metrics(settings.model_name)
        self.tokenizer: TokenCounter = tokenizer_from(settings.tokenizer)
        self.prefix = PrefixCache(settings.prefix_cache_blocks)
        self.store = kvchannel.KVStore(settings.lease_s)
        self.channel: kvchannel.SideChannel | None = None
        self.slots = asyncio.Semaphore(self.model.decode_slots)
        self.compute = asyncio.Lock()  # one prefill at a time (FIFO)
        self.running = 0
        self.waiting = 0
        self.kv_tokens = 0
        self.active = 0  # requests inside a handler
        self.faults = Faults()
        self.received: deque[dict[str, Any]] = deque(maxlen=max(settings.record_requests, 1))
        self.port = settings.port
        self._runner: web.AppRunner | None = None
        self._supervisor = Supervisor(f"engine-{settings.role}")
        # request id -> phase -> time.monotonic(), for up to settings.timeline requests
        self.timeline: dict[str, dict[str, float]] = {}

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @property
    def side_channel_port(self) -> int:
        return self.channel.port if self.channel is not None else 0

    async def __aenter__(self) -> Engine:
        s = self.settings
        await self._supervisor.__aenter__()
        try:
            if s.role == "prefill":
                # in a namespace the side channel sits on the host's data address; else
                # beside the HTTP port (a container binds 0.0.0.0 and announces its address)
                self.channel = kvchannel.SideChannel(
                    self.store, self.model.bytes_per_token, ns=s.ns,
                    host=s.announced_host if s.ns is not None else s.host,
                    port=s.side_channel_port, on_served=self._served)
                await self.channel.__aenter__()
                self._supervisor.spawn(self._sweep_leases(), name="leases")
            app = self.app()
            self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                         shutdown_timeout=2.0)
            await self._runner.setup()
            sock = kvchannel.listening_socket(None, s.host, s.port)
            self.port = sock.getsockname()[1]
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        log.info("engine up", role=s.role, url=self.url, side_channel=self.side_channel_port,
                 engine_id=s.engine_id)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.channel is not None:
            await self.channel.__aexit__(None, None, None)
        await self._supervisor.stop()

    async def _sweep_leases(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            expired = self.store.sweep()
            if expired:
                self.metrics.lease_expired.inc(expired)
            self._gauges()

    def _served(self, nbytes: int, seconds: float) -> None:
        self.metrics.kv_served.inc(nbytes)
        self.metrics.kv_transfers.labels("served").inc()
        self._gauges()

    def _gauges(self) -> None:
        m = self.metrics
        m.running.set(self.running)
        m.waiting.set(self.waiting)
        held = self.kv_tokens + self.store.held_tokens
        m.kv_usage.set(min(held / self.model.capacity_tokens, 1.0))
        m.leases.set(len(self.store.leases))

    def mark(self, request_id: str, phase: str, at: float | None = None) -> None:
        """Record when ``request_id`` reached ``phase`` (only with ``settings.timeline``)."""
        if not self.settings.timeline or not request_id:
            return
        marks = self.timeline.get(request_id)
        if marks is None:
            if len(self.timeline) >= self.settings.timeline:
                return
            marks = self.timeline[request_id] = {}
        marks.setdefault(phase, time.monotonic() if at is None else at)

    # -- HTTP -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/netkv/state", self.state)
        if self.settings.test_hooks:
            app.router.add_post("/netkv/faults", self.set_faults)
            app.router.add_get("/netkv/requests", self.requests_seen)
        return app

    async def health(self, request: web.Request) -> web.Response:
        if self.faults.health_status:
            return web.Response(status=self.faults.health_status)
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        body = ModelList(data=[ModelCard(id=self.settings.model_name, created=now_s())])
        return web.Response(body=msgspec.json.encode(body), content_type="application/json")

    async def metrics_page(self, request: web.Request) -> web.Response:
        self._gauges()
        return web.Response(body=generate_latest(self.metrics.registry),
                            content_type="text/plain", charset="utf-8")

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response({
            "role": self.settings.role, "engine_id": self.settings.engine_id,
            "running": self.running, "waiting": self.waiting, "active": self.active,
            "leases": len(self.store.leases), "rooms": len(self.store.rooms),
            "side_channel_port": self.side_channel_port,
            "side_channel_connections": self.channel.open_connections if self.channel else 0,
            "lease_expired_total": self.store.expired_total})

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults = decode_body(await request.read(), Faults)
        except BodyError as exc:
            return _error(400, exc.message, "BadRequestError", exc.field)
        return web.json_response(msgspec.to_builtins(self.faults))

    async def requests_seen(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.received))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def _serve(self, request: web.Request, kind: Literal["completion", "chat"]
                     ) -> web.StreamResponse:
        arrived = time.monotonic()
        self.active += 1
        try:
            raw = await request.read()
            try:
                prep = prepare(raw, kind, request.headers.get("X-Request-Id"), self.tokenizer,
                               self.settings)
            except BodyError as exc:
                self.metrics.rejected.labels(exc.reason).inc()
                return _error(400, exc.message, "BadRequestError", exc.field)
            if self.settings.timeline:
                self.mark(prep.request_id, "received", arrived)
                self.mark(prep.request_id, "parsed")
            if self.settings.test_hooks:
                self.received.append({"path": request.path, "request_id": prep.request_id,
                                      "body": msgspec.json.decode(raw)})
                if self.faults.stall_s:
                    await asyncio.sleep(self.faults.stall_s)
                if self.faults.completions_status:
                    return _error(self.faults.completions_status, "injected fault",
                                  "ServiceUnavailableError")
            return await self._run(request, prep, arrived)
        finally:
            self.active -= 1

    # -- the two phases ---------------------------------------------------------------------
    async def _prefill(self, tokens: list[int], request_id: str = "") -> float:
        """Modelled prefill of the tokens not in this engine's prefix cache; returns s."""
        hashes = block_hashes(tokens, self.settings.block_size)
        cached = self.prefix.match(hashes) * self.settings.block_size
        self.waiting += 1
        self._gauges()
        entered = False
        try:
            async with self.compute:
                self.waiting -= 1
                entered = True
                self.running += 1
                self._gauges()
                self.mark(request_id, "compute_start")
                try:
                    seconds = self.model.prefill_s(max(len(tokens) - cached, 0))
                    await asyncio.sleep(seconds)
                finally:
                    self.running -= 1
                    self.mark(request_id, "compute_end")
        finally:
            if not entered:
                self.waiting -= 1
        self.prefix.insert(hashes)
        self.metrics.prompt_tokens.inc(len(tokens))
        self.metrics.prefill_time.observe(seconds)
        return seconds

    async def _receive_kv(self, prep: Prepared) -> None:
        """Bring the prompt's KV here before the first token (decode side)."""
        s = self.settings
        hashes = block_hashes(prep.tokens, s.block_size)
        hit = self.prefix.match(hashes)
        params = prep.params
        start = time.monotonic()
        try:
            if prep.bootstrap is not None:
                host, port, room = prep.bootstrap
                done = await kvchannel.register(s.ns, host, port, room, skip_blocks=hit,
                                                timeout_s=s.pull_timeout_s)
            else:
                assert params is not None and params.remote_host is not None
                assert params.remote_port is not None and params.remote_request_id is not None
                ids = params.flat_block_ids()
                done = await kvchannel.pull(s.ns, params.remote_host, params.remote_port,
                                            params.remote_request_id,
                                            block_ids=ids[hit:] if ids else None,
                                            skip_blocks=hit, timeout_s=s.pull_timeout_s)
        except (OSError, TimeoutError, ValueError, kvchannel.KVChannelError) as exc:
            # vLLM's kv_load_failure_policy "recompute": prefill the prompt here instead.
            self.metrics.kv_failures.inc()
            log.warning("kv pull failed; recomputing", request=prep.request_id,
                        error=repr(exc))
            await self._prefill(prep.tokens, prep.request_id)
            return
        self.mark(prep.request_id, "kv_start", start)
        self.mark(prep.request_id, "kv_end", start + done.seconds)
        self.prefix.insert(hashes)
        prep.kv, prep.kv_start = done, start
        self.metrics.kv_pulled.inc(done.nbytes)
        self.metrics.kv_transfers.labels("pulled").inc()
        self.metrics.kv_transfer_s.observe(done.seconds)

    async def _run(self, request: web.Request, prep: Prepared,
                   arrived: float) -> web.StreamResponse:
        params = prep.params
        extra: dict[str, Any] | None = None
        n_out = prep.max_tokens
        role = self.settings.role
        if params is not None and params.do_remote_decode:  # the prefill leg
            await self._prefill(prep.tokens, prep.request_id)
            lease = self.store.hold(prep.request_id, len(prep.tokens), self.settings.block_size)
            self._gauges()
            extra = {"do_remote_prefill": True, "do_remote_decode": False,
                     "remote_block_ids": lease.block_ids,
                     "remote_engine_id": self.settings.engine_id,
                     "remote_request_id": prep.request_id,
                     "remote_host": self.settings.announced_host,
                     "remote_port": self.side_channel_port, "tp_size": 1}
            return await self._prefill_answer(request, prep, arrived, extra)
        if prep.bootstrap is not None and role == "prefill":
            await self._prefill(prep.tokens, prep.request_id)
            self.store.hold(prep.request_id, len(prep.tokens), self.settings.block_size,
                            room=prep.bootstrap[2])
            self._gauges()
            return await self._prefill_answer(request, prep, arrived, None)
        if prep.bootstrap is not None or (params is not None and params.pull_ready()):
            self.waiting += 1
            self._gauges()
            try:
                await self._receive_kv(prep)
            finally:
                self.waiting -= 1
        else:
            await self._prefill(prep.tokens, prep.request_id)
        return await self._decode(request, prep, n_out, arrived, extra)

    async def _prefill_answer(self, request: web.Request, prep: Prepared, arrived: float,
                              extra: dict[str, Any] | None) -> web.StreamResponse:
        """A prefill leg's answer: the one token the prefill pass itself produces (no decode
        step, no decode slot), with the KV's whereabouts in ``extra``."""
        m = self.metrics
        m.ttft.observe(time.monotonic() - arrived)
        resp = await self._stream(request, prep, 1, 0.0) if prep.stream else \
            answer(prep, 1, extra, self.settings.engine_id)
        m.generation_tokens.inc(1)
        m.success.labels(**m.labels, finished_reason="length").inc()
        m.e2e.observe(time.monotonic() - arrived)
        self.mark(prep.request_id, "answered")
        return resp

    async def _decode(self, request: web.Request, prep: Prepared, n_out: int,
                      arrived: float, extra: dict[str, Any] | None) -> web.StreamResponse:
        m = self.metrics
        self.waiting += 1
        self._gauges()
        acquired = False
        try:
            await self.slots.acquire()
            acquired = True
            self.waiting -= 1
            self.running += 1
            self.mark(prep.request_id, "slot")
            held = len(prep.tokens) + n_out
            self.kv_tokens += held
            self._gauges()
            try:
                step = self.model.tpot_s
                if n_out > 1 and step * (n_out - 1) > self.model.max_decode_hold_s:
                    step = self.model.max_decode_hold_s / (n_out - 1)
                await asyncio.sleep(self.model.decode_step_s)
                m.ttft.observe(time.monotonic() - arrived)
                if prep.stream:
                    resp = await self._stream(request, prep, n_out, step)
                else:
                    await asyncio.sleep(step * (n_out - 1))
                    resp = answer(prep, n_out, extra, self.settings.engine_id)
                m.generation_tokens.inc(n_out)
                m.success.labels(**m.labels, finished_reason="length").inc()
                m.e2e.observe(time.monotonic() - arrived)
                return resp
            finally:
                self.running -= 1
                self.kv_tokens -= held
                self.mark(prep.request_id, "done")
        finally:
            if acquired:
                self.slots.release()
            else:
                self.waiting -= 1
            self._gauges()

    async def _stream(self, request: web.Request, prep: Prepared, n_out: int,
                      step: float) -> web.StreamResponse:
        return await stream(request, prep, n_out, step, every=self.settings.stream_interval,
                            engine_id=self.settings.engine_id,
                            on_first=lambda: self.mark(prep.request_id, "first_write"))


@contextlib.asynccontextmanager
async def serving(settings: EngineSettings) -> AsyncIterator[Engine]:
    async with Engine(settings) as engine:
        yield engine


__all__ = ["Engine", "EngineSettings", "serving"]
