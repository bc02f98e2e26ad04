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
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from netkv.contracts.kvtransfer import DEFAULT_KV_LEASE_S, KVTransferParams
from netkv.contracts.openai import (
    BODY_ERROR_REASONS,
    SSE_DONE,
    AssistantMessage,
    BodyError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    Usage,
    decode_body,
    now_s,
    sse,
)
from netkv.core.prefix_cache import PrefixCache
from netkv.engine import kvchannel
from netkv.engine.model import EngineModel
from netkv.errors import InputError
from netkv.http.openai_errors import openai_error as _error
from netkv.prompts import (
    VLLM_BLOCK_TOKENS,
    TokenCounter,
    block_hashes,
    render_chat,
    tokenizer_from,
)
from netkv.supervisor import Supervisor

log = structlog.get_logger(__name__)

Role = Literal["prefill", "decode"]
WORDS = (" the", " network", " moves", " the", " cache", " to", " the", " decoder", ",",
         " and", " the", " first", " token", " follows", ".")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # vLLM's TTFT buckets
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]{1,256}$")
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; used for chat too


@dataclass(frozen=True, slots=True)
class EngineSettings:
    role: Role
    model_name: str = "netkv/emulated"
    host: str = "127.0.0.1"
    port: int = 0
    side_channel_host: str | None = None  # announced as remote_host (default: host)
    side_channel_port: int = 0
    engine_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    block_size: int = VLLM_BLOCK_TOKENS
    lease_s: float = DEFAULT_KV_LEASE_S
    prefix_cache_blocks: int = 100_000
    tokenizer: str | None = None
    test_hooks: bool = False
    record_requests: int = 64
    pull_timeout_s: float = 60.0
    stream_interval: int = 1  # tokens per streamed write (vLLM's --stream-interval)
    max_model_len: int = 131_072  # prompt + output tokens (vLLM's --max-model-len)
    ns: str | None = None  # network namespace for the sockets (testbed only)
    model: EngineModel = EngineModel()
    timeline: int = 0  # keep the phase timestamps of up to this many requests (testbeds)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise InputError("--role", "must be prefill or decode")
        for name in ("port", "side_channel_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise InputError(f"--{name.replace('_', '-')}", "must be in 0..65535")
        if not 1 <= self.block_size <= 65536:
            raise InputError("--block-size", "must be in 1..65536")
        if not 1 <= self.stream_interval <= 1024:
            raise InputError("--stream-interval", "must be in 1..1024")
        if not 0 < self.lease_s <= 3600:
            raise InputError("--kv-lease-s", "must be in (0, 3600]")

    @property
    def announced_host(self) -> str:
        return self.side_channel_host or self.host


class Faults(msgspec.Struct, kw_only=True):
    """``POST /netkv/faults`` (test hooks only)."""

    completions_status: int | None = None
    health_status: int | None = None
    stall_s: float = 0.0


class Metrics:
    """vLLM's metric names (and NetKV's own for the KV side channel), one registry per
    engine so that many engines can share a process."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ("model_name", "engine")
        self.labels = {"model_name": model_name, "engine": "0"}
        self.running = Gauge("vllm:num_requests_running", "Requests in the model batch",
                             labels, registry=r).labels(**self.labels)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting (queue or KV)",
                             labels, registry=r).labels(**self.labels)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full",
                              labels, registry=r).labels(**self.labels)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token",
                              labels, buckets=TTFT_BUCKETS, registry=r).labels(**self.labels)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end latency",
                             labels, buckets=TTFT_BUCKETS, registry=r).labels(**self.labels)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds",
                                      "Time in the prefill phase", labels,
                                      buckets=TTFT_BUCKETS, registry=r).labels(**self.labels)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", labels,
                                     registry=r).labels(**self.labels)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated",
                                         labels, registry=r).labels(**self.labels)
        self.success = Counter("vllm:request_success", "Finished requests",
                               (*labels, "finished_reason"), registry=r)
        self.kv_pulled = Counter("netkv_engine_kv_pulled_bytes", "KV bytes read from "
                                 "prefills' side channels", registry=r)
        self.kv_served = Counter("netkv_engine_kv_served_bytes", "KV bytes sent from this "
                                 "engine's side channel", registry=r)
        self.kv_transfers = Counter("netkv_engine_kv_transfers", "Completed KV transfers",
                                    ("direction",), registry=r)
        self.kv_transfer_s = Histogram("netkv_engine_kv_transfer_seconds", "KV transfer "
                                       "time as the decode sees it", buckets=TTFT_BUCKETS,
                                       registry=r)
        self.kv_failures = Counter("netkv_engine_kv_pull_failures", "KV reads that failed "
                                   "(the decode then recomputes the prompt)", registry=r)
        self.leases = Gauge("netkv_engine_kv_leases", "KV leases held for remote decodes",
                            registry=r)
        self.lease_expired = Counter("netkv_engine_kv_lease_expired", "Leases that ran out "
                                     "before a decode read them", registry=r)
        self.rejected = Counter("netkv_engine_rejected_requests", "Bodies rejected at the "
                                "edge", ("reason",), registry=r)
        for reason in BODY_ERROR_REASONS:
            self.rejected.labels(reason)


@dataclass(slots=True)
class Prepared:
    """A validated request, in the engine's terms."""

    kind: Literal["completion", "chat"]
    request_id: str
    tokens: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    params: KVTransferParams | None
    bootstrap: tuple[str, int, int] | None  # host, port, room
    model: str
    kv: kvchannel.Transfer | None = None  # the KV this decode received
    kv_start: float = 0.0  # time.monotonic() when the transfer began


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
                prep = self._prepare(request, raw, kind)
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

    def _prepare(self, request: web.Request, raw: bytes,
                 kind: Literal["completion", "chat"]) -> Prepared:
        body: CompletionRequest | ChatCompletionRequest
        if kind == "completion":
            body = decode_body(raw, CompletionRequest)
            prompt = body.prompt_value()
            limit = body.max_tokens or DEFAULT_MAX_TOKENS
        else:
            body = decode_body(raw, ChatCompletionRequest)
            prompt = render_chat([(m.role, m.text()) for m in body.messages])
            limit = body.output_limit(DEFAULT_MAX_TOKENS)
        tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if not tokens:
            raise BodyError("prompt", "is empty after tokenization", "invalid")
        if len(tokens) + limit > self.settings.max_model_len:
            raise BodyError("max_tokens", f"this model's maximum context length is "
                            f"{self.settings.max_model_len} tokens; the request has "
                            f"{len(tokens)} prompt tokens and asks for {limit} more",
                            "out_of_range")
        bootstrap = None
        if body.bootstrap_room is not None:
            if body.bootstrap_host is None or body.bootstrap_port is None:
                raise BodyError("bootstrap_host", "bootstrap_room needs bootstrap_host and "
                                "bootstrap_port", "missing_field")
            bootstrap = (body.bootstrap_host, body.bootstrap_port, body.bootstrap_room)
        rid = request.headers.get("X-Request-Id") or f"cmpl-{uuid.uuid4().hex}"
        return Prepared(kind, rid[:256], tokens, limit, body.stream,
                        bool(body.stream_options and body.stream_options.include_usage),
                        body.kv_transfer_params, bootstrap,
                        body.model or self.settings.model_name)

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
        resp = await self._stream(request, prep, 1, 0.0, extra) if prep.stream else \
            self._answer(prep, 1, extra)
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
                    resp = await self._stream(request, prep, n_out, step, extra)
                else:
                    await asyncio.sleep(step * (n_out - 1))
                    resp = self._answer(prep, n_out, extra)
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

    def _answer(self, prep: Prepared, n_out: int,
                extra: dict[str, Any] | None) -> web.Response:
        text = "".join(WORDS[i % len(WORDS)] for i in range(n_out))
        usage = Usage(prompt_tokens=len(prep.tokens), completion_tokens=n_out,
                      total_tokens=len(prep.tokens) + n_out)
        body: Completion | ChatCompletion
        if prep.kind == "completion":
            body = Completion(id=prep.request_id, created=now_s(), model=prep.model,
                              choices=[CompletionChoice(text=text, finish_reason="length")],
                              usage=usage, kv_transfer_params=extra)
        else:
            body = ChatCompletion(id=prep.request_id, created=now_s(), model=prep.model,
                                  choices=[ChatChoice(message=AssistantMessage(content=text),
                                                      finish_reason="length")],
                                  usage=usage, kv_transfer_params=extra)
        return web.Response(body=msgspec.json.encode(body), content_type="application/json",
                            headers=_headers(prep, self.settings.engine_id))

    async def _stream(self, request: web.Request, prep: Prepared, n_out: int, step: float,
                      extra: dict[str, Any] | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            **_headers(prep, self.settings.engine_id)})
        await resp.prepare(request)
        created = now_s()
        every = self.settings.stream_interval
        buf: list[bytes] = []
        owed = 0.0  # generation time of the tokens in buf, not yet slept
        for i, chunk in enumerate(self._chunks(prep, n_out, created)):
            if i > 0:
                owed += step
            buf.append(chunk)
            if i <= 1 or len(buf) >= every:  # the first token goes out at once
                if owed:
                    await asyncio.sleep(owed)
                    owed = 0.0
                await resp.write(b"".join(buf))
                buf.clear()
                if i == 0:
                    self.mark(prep.request_id, "first_write")
        if owed:
            await asyncio.sleep(owed)
        await resp.write(b"".join(buf) + SSE_DONE)
        await resp.write_eof()
        return resp

    def _chunks(self, prep: Prepared, n_out: int, created: int) -> Iterator[bytes]:
        rid, model = prep.request_id, prep.model
        if prep.kind == "chat":
            yield sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                ChatChunkChoice(delta=Delta(role="assistant", content=""))]))
        for i in range(n_out):
            word = WORDS[i % len(WORDS)]
            last = i == n_out - 1
            reason: Literal["length"] | None = "length" if last else None
            if prep.kind == "chat":
                yield sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                    ChatChunkChoice(delta=Delta(content=word), finish_reason=reason)]))
            else:
                yield sse(CompletionChunk(id=rid, created=created, model=model, choices=[
                    CompletionChoice(text=word, finish_reason=reason)]))
        if prep.include_usage:
            usage = Usage(prompt_tokens=len(prep.tokens), completion_tokens=n_out,
                          total_tokens=len(prep.tokens) + n_out)
            chunk: ChatCompletionChunk | CompletionChunk
            if prep.kind == "chat":
                chunk = ChatCompletionChunk(id=rid, created=created, model=model, choices=[],
                                            usage=usage)
            else:
                chunk = CompletionChunk(id=rid, created=created, model=model, choices=[],
                                        usage=usage)
            yield sse(chunk)


def _headers(prep: Prepared, engine_id: str) -> dict[str, str]:
    """The request id; ``x-netkv-engine``, this engine's id; on a decode handed a remote
    prefill, ``x-netkv-kv-from``: the prefill it was told to take the KV from (its
    ``remote_engine_id``, or ``bootstrap_host:bootstrap_port``), sent whether or not the
    transfer worked, so that whatever router chose the pair, the pair is known; and, when the
    KV arrived, its bytes, start and end on this host's monotonic clock (which the testbeds
    share with their clients)."""
    out = {"x-request-id": prep.request_id, "x-netkv-engine": engine_id}
    params = prep.params
    if prep.bootstrap is not None:
        out["x-netkv-kv-from"] = f"{prep.bootstrap[0]}:{prep.bootstrap[1]}"
    elif params is not None and params.do_remote_prefill and params.remote_engine_id \
            and _HEADER_SAFE.match(params.remote_engine_id):  # from a body: no CR/LF
        out["x-netkv-kv-from"] = params.remote_engine_id
    if prep.kv is not None:
        out["x-netkv-kv-bytes"] = str(prep.kv.nbytes)
        out["x-netkv-kv-start"] = f"{prep.kv_start:.6f}"
        out["x-netkv-kv-end"] = f"{prep.kv_start + prep.kv.seconds:.6f}"
    return out


@contextlib.asynccontextmanager
async def serving(settings: EngineSettings) -> AsyncIterator[Engine]:
    async with Engine(settings) as engine:
        yield engine
