"""The proxy's HTTP front and the two legs of every request.

Pull flow (vLLM NixlConnector, the default), as vLLM's reference proxy, llm-d's sidecar and
vllm-router do it, with one difference: the decode is chosen *after* the prefill answered,
knowing the prefill's host, by NetKV's decision core.

1. The prefill gets the client's body with ``kv_transfer_params = {do_remote_decode: true,
   do_remote_prefill: false, remote_*: null}``, ``max_tokens = 1`` (and
   ``max_completion_tokens``), ``stream = false``, without ``stream_options`` and
   ``min_tokens``. A 502/503/504, a timeout or a refused connection is retried on another
   prefill (at most ``prefill_retries`` times).
2. The decode is placed (:mod:`netkv_proxy.placement`) and booked.
3. The decode gets the client's body with the prefill's ``kv_transfer_params`` (verbatim in
   pull mode; without block ids in push mode), and its answer is passed to the client chunk
   by chunk. The transfer's booking is handed back when the decode answers (the KV is in);
   the placement when the stream ends, fails or the client goes away.

Bootstrap flow (SGLang): the pair is chosen first (``netkv_pair`` chooses it jointly), the
same body goes to both with ``bootstrap_host``/``bootstrap_port`` of the prefill and a random
63-bit ``bootstrap_room``, and the decode's answer is streamed back.

Errors are in OpenAI's shape; ``x-request-id`` (the client's, or a new one) goes to both legs
and back. Answers say where they went: ``x-netkv-prefill``, ``x-netkv-decode``,
``x-netkv-tier``, ``x-netkv-predicted-ms``, and ``x-netkv-map`` (``map v<version>`` or
``prior: <why>`` when the tier priors were used).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import msgspec
import structlog
from aiohttp import web
from prometheus_client import generate_latest
from yarl import URL

from netkv.contracts.kvtransfer import (
    KVTransferParams,
    prefill_request_params,
    push_decode_params,
)
from netkv.contracts.openai import (
    BodyError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    decode_body,
    error_body,
    sse,
)
from netkv.core.topology import Topology
from netkv.http.server import ConnectionGuard
from netkv.prompts import TokenCounter, block_hashes, render_chat, tokenizer_from
from netkv.routing.mapfeed import MapFeed
from netkv.supervisor import Supervisor
from netkv_proxy.config import ProxySettings
from netkv_proxy.metrics import ProxyMetrics
from netkv_proxy.placement import Placed, Placement
from netkv_proxy.prefill import PrefillChooser
from netkv_proxy.workers import Worker, WorkerPool

log = structlog.get_logger(__name__)

Kind = Literal["completion", "chat"]
PATHS: dict[Kind, str] = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}
RETRY_STATUS = frozenset({502, 503, 504})
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,256}$")


class BodyTimeoutError(Exception):
    """The client's body did not arrive within ``body_timeout_s``."""


class UpstreamError(Exception):
    """A leg failed; ``response`` is what the client gets."""

    def __init__(self, response: web.Response, outcome: str) -> None:
        super().__init__(outcome)
        self.response, self.outcome = response, outcome


def openai_error(status: int, message: str, type_: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(message, type_, param=param,
                                                       code=status),
                        content_type="application/json", headers=headers)


@dataclass(slots=True)
class Job:
    """One client request on its way through the proxy."""

    kind: Kind
    request_id: str
    body: dict[str, Any]
    tokens: int
    hashes: list[int]
    output_tokens: int
    stream: bool
    headers: dict[str, str]
    arrived: float
    endpoint: str
    outcome: str = "ok"


class Proxy:
    """``async with Proxy(settings, topology, feed)``; :meth:`app` is the aiohttp app."""

    def __init__(self, settings: ProxySettings, topology: Topology,
                 feed: MapFeed | None = None) -> None:
        self.settings = settings
        self.topology = topology
        self.feed = feed
        self.pool = WorkerPool(settings.prefill, settings.decode, topology,
                               eject_after=settings.eject_after,
                               readmit_after=settings.readmit_after)
        self.placement = Placement(
            topology, self.pool, feed=feed, policy=settings.policy,
            policy_params=settings.policy_params, bytes_per_token=settings.bytes_per_token,
            capacity_tokens=settings.capacity_tokens, block_tokens=settings.block_size,
            prefix_blocks=settings.prefix_blocks)
        self.prefills = PrefillChooser(self.pool, block_tokens=settings.block_size,
                                       prefix_blocks=settings.prefix_blocks)
        self.metrics = ProxyMetrics()
        self.tokenizer: TokenCounter = tokenizer_from(settings.tokenizer)
        self.supervisor = Supervisor("proxy")
        self.upstream_open = 0
        self._session: aiohttp.ClientSession | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self.guard: ConnectionGuard | None = None  # set by the server (client connections)
        # The hot path's constants, built once: parsed upstream URLs, the decode leg's
        # timeout, and the metric children of the fixed label sets.
        self._urls: dict[tuple[str, Kind], URL] = {}
        self._decode_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s,
            sock_read=settings.decode_read_timeout_s)
        self._counted: dict[tuple[str, str], Any] = {}
        self._decided: dict[tuple[str, str, str], Any] = {}

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> Proxy:
        s = self.settings
        # One session for every leg: keep-alive connections to the workers are reused, no
        # cookie jar (the workers set none; the jar is consulted on every request otherwise).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=s.max_connections, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        self._health_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64))
        await self.supervisor.__aenter__()
        try:
            await self.pool.check_all(self._health_session, s.health_timeout_s)
            self.supervisor.spawn(self.pool.run(self._health_session, s.health_interval_s,
                                                s.health_timeout_s), name="health")
            if self.feed is not None:
                self.feed.spawn(self.supervisor)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.supervisor.stop()
        for session in (self._session, self._health_session):
            if session is not None:
                await session.close()
        self._session = self._health_session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use Proxy as an async context manager"
        return self._session

    def _url(self, worker: Worker, kind: Kind) -> URL:
        url = self._urls.get((worker.base, kind))
        if url is None:
            url = self._urls[(worker.base, kind)] = URL(worker.base + PATHS[kind])
        return url

    def _count(self, endpoint: str, outcome: str) -> None:
        child = self._counted.get((endpoint, outcome))
        if child is None:
            child = self._counted[(endpoint, outcome)] = self.metrics.requests.labels(
                endpoint, outcome)
        child.inc()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes,
                              middlewares=[_json_errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/netkv/state", self.state)
        return app

    # -- small endpoints --------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        cards = [ModelCard(id=m) for m in self.pool.models()]
        return web.Response(body=msgspec.json.encode(ModelList(data=cards)),
                            content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        p = [w for w in self.pool.prefills if w.healthy]
        d = [w for w in self.pool.decodes if w.healthy]
        ok = bool(p and d) and self.supervisor.healthy
        body = {"status": "ok" if ok else "unavailable", "prefill_healthy": len(p),
                "decode_healthy": len(d), "map": self.placement.map_state().source,
                "failures": [f.name for f in self.supervisor.failures]}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        m = self.metrics
        for w in self.pool.all:
            m.worker_healthy.labels(w.name, w.role).set(1 if w.healthy else 0)
            m.worker_ejections.labels(w.name, w.role).set(w.ejections)
            m.worker_inflight.labels(w.name, w.role).set(w.inflight)
        m.bookings.set(self.placement.bookings.active)
        state = self.placement.map_state()
        m.map_stale.set(1 if state.source == "prior" else 0)
        m.map_age.set(state.age_s if state.age_s is not None else float("nan"))
        return web.Response(body=generate_latest(m.registry), content_type="text/plain",
                            charset="utf-8")

    async def state(self, request: web.Request) -> web.Response:
        """What is open right now (leak checks): bookings, placements, upstream requests."""
        return web.json_response({
            "bookings": self.placement.bookings.active,
            "placements": len(self.placement.open),
            "upstream_open": self.upstream_open,
            "tasks": len(asyncio.all_tasks()),
            "workers": [{"name": w.name, "role": w.role, "healthy": w.healthy,
                         "inflight": w.inflight, "ejections": w.ejections,
                         "running": w.running, "waiting": w.waiting, "kv_use": w.kv_use,
                         "last_error": w.last_error} for w in self.pool.all]})

    # -- completions ------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    def _job(self, request: web.Request, raw: bytes, kind: Kind, rid: str) -> Job:
        typed: CompletionRequest | ChatCompletionRequest
        if kind == "completion":
            typed = decode_body(raw, CompletionRequest)
            prompt = typed.prompt_value()
            limit = typed.max_tokens or self.settings.default_max_tokens
        else:
            typed = decode_body(raw, ChatCompletionRequest)
            prompt = render_chat([(m.role, m.text()) for m in typed.messages])
            limit = typed.output_limit(self.settings.default_max_tokens)
        tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        body = msgspec.json.decode(raw)
        if not isinstance(body, dict):
            raise BodyError("body", "must be a JSON object", "wrong_type")
        headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
        auth = request.headers.get("Authorization")
        if auth:
            headers["Authorization"] = auth
        return Job(kind, rid, body, len(tokens), block_hashes(tokens, self.settings.block_size),
                   limit, typed.stream, headers, time.perf_counter(),
                   "completions" if kind == "completion" else "chat")

    async def _handle(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        arrived = time.perf_counter()
        given = request.headers.get("X-Request-Id", "")
        rid = given if _REQUEST_ID.match(given) else f"netkv-{uuid.uuid4().hex}"
        endpoint = "completions" if kind == "completion" else "chat"
        try:
            job = self._job(request, await self._read(request), kind, rid)
        except BodyError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            self._count(endpoint, "bad_request")
            return openai_error(400, exc.message, "BadRequestError", param=exc.field,
                                headers={"x-request-id": rid})
        except BodyTimeoutError:
            self._count(endpoint, "bad_request")
            return openai_error(408, f"body not received within "
                                f"{self.settings.body_timeout_s:g} s", "RequestTimeoutError",
                                param="body", headers={"x-request-id": rid,
                                                       "Connection": "close"})
        job.arrived = arrived
        outcome = "cancelled"
        try:
            if self.settings.mode == "bootstrap":
                response = await self._bootstrap(request, job)
            else:
                response = await self._pull(request, job)
            outcome = job.outcome
            return response
        except UpstreamError as exc:
            outcome = exc.outcome
            exc.response.headers["x-request-id"] = rid
            return exc.response
        finally:
            self._count(endpoint, outcome)

    async def _read(self, request: web.Request) -> bytes:
        """The body, within ``body_timeout_s`` (a trickled body is a 408)."""
        if request.content.is_eof():  # it all came with the head: no timer needed
            return await request.read()
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                return await request.read()
        except TimeoutError:
            raise BodyTimeoutError from None

    # -- the prefill leg --------------------------------------------------------------------
    def _prefill_body(self, job: Job) -> bytes:
        body = dict(job.body)
        body["kv_transfer_params"] = prefill_request_params()
        body["stream"] = False
        body["max_tokens"] = 1
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = 1
        for key in ("stream_options", "min_tokens", "min_completion_tokens"):
            body.pop(key, None)
        return msgspec.json.encode(body)

    async def _post_prefill(self, worker: Worker, job: Job, data: bytes
                            ) -> tuple[int, bytes]:
        """One prefill attempt; raises TimeoutError or aiohttp/OS errors."""
        worker.inflight += 1
        self.upstream_open += 1
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.prefill_timeout_s):
                async with self.session.post(self._url(worker, job.kind), data=data,
                                             headers=job.headers) as resp:
                    payload = await resp.read()
            if resp.status == 200:
                seconds = time.perf_counter() - start
                worker.observe_prefill(seconds)
                self.metrics.prefill.observe(seconds)
            return resp.status, payload
        finally:
            worker.inflight -= 1
            self.upstream_open -= 1

    async def _prefill(self, job: Job) -> tuple[Worker, dict[str, Any]]:
        """The prefill leg with retries; returns the prefill and its kv_transfer_params."""
        data = self._prefill_body(job)
        tried: set[int] = set()
        last = "no healthy prefill worker"
        for attempt in range(self.settings.prefill_retries + 1):
            choice = self.prefills.choose(job.tokens, job.hashes, tried)
            if choice is None:
                break
            worker = choice.worker
            tried.add(worker.index)
            reason = ""
            try:
                status, payload = await self._post_prefill(worker, job, data)
            except TimeoutError:
                reason, last = "timeout", f"prefill {worker.name} timed out after " \
                    f"{self.settings.prefill_timeout_s:g} s"
            except (aiohttp.ClientError, OSError) as exc:
                self.pool.failed(worker, f"{type(exc).__name__}: {exc}", at_once=True)
                reason, last = "connect", f"prefill {worker.name}: {type(exc).__name__}"
            else:
                if status in RETRY_STATUS:
                    reason, last = str(status), f"prefill {worker.name} answered HTTP {status}"
                elif status != 200:  # the client's fault (4xx): pass the engine's answer on
                    raise UpstreamError(web.Response(status=status, body=payload,
                                                      content_type="application/json"),
                                         "upstream_error")
                else:
                    return worker, self._kv_params(worker, payload)
            finally:
                self.prefills.release(choice)
            if attempt < self.settings.prefill_retries:
                self.metrics.retries.labels(reason).inc()
            log.warning("prefill leg failed", request=job.request_id, worker=worker.name,
                        reason=reason)
        status = 503 if not tried else 502
        raise UpstreamError(openai_error(status, last, "ServiceUnavailableError"
                                          if status == 503 else "BadGatewayError"),
                             "no_worker" if not tried else "prefill_failed")

    @staticmethod
    def _kv_params(worker: Worker, payload: bytes) -> dict[str, Any]:
        try:
            answer = msgspec.json.decode(payload)
            raw = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
            if not isinstance(raw, dict):
                raise ValueError("no kv_transfer_params in the answer")
            msgspec.convert(raw, KVTransferParams)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            raise UpstreamError(openai_error(
                502, f"prefill {worker.name} answered without valid kv_transfer_params: "
                f"{exc}", "BadGatewayError"), "prefill_failed") from None
        return raw

    async def _pull(self, request: web.Request, job: Job) -> web.StreamResponse:
        prefill, params = await self._prefill(job)
        prefill_done = time.perf_counter()
        placed = self.placement.place(prefill, job.tokens, job.hashes, job.output_tokens)
        if placed is None:
            raise UpstreamError(openai_error(503, "no healthy decode worker",
                                              "ServiceUnavailableError"), "no_worker")
        try:
            body = dict(job.body)
            body["kv_transfer_params"] = params if self.settings.mode == "pull" else \
                push_decode_params(msgspec.convert(params, KVTransferParams))
            return await self._decode(request, job, placed, msgspec.json.encode(body),
                                      prefill_done)
        finally:
            self.placement.release(placed)

    async def _bootstrap(self, request: web.Request, job: Job) -> web.StreamResponse:
        joint = self.settings.policy == "netkv_pair"
        choice = None if joint else self.prefills.choose(job.tokens, job.hashes, set())
        prefill = None if choice is None else choice.worker
        placed = None if (prefill is None and not joint) else \
            self.placement.place(prefill, job.tokens, job.hashes, job.output_tokens)
        if choice is not None and placed is None:
            self.prefills.release(choice)
        if placed is None:
            raise UpstreamError(openai_error(503, "no healthy prefill/decode pair",
                                              "ServiceUnavailableError"), "no_worker")
        prefill_task: asyncio.Task[tuple[int, bytes]] | None = None
        try:
            body = dict(job.body)
            body.update(bootstrap_host=placed.prefill.bootstrap_host,
                        bootstrap_port=placed.prefill.bootstrap_port,
                        bootstrap_room=secrets.randbits(63))
            pbody = dict(body, stream=False)
            pbody.pop("stream_options", None)
            prefill_task = asyncio.ensure_future(self._post_prefill(
                placed.prefill, job, msgspec.json.encode(pbody)))
            if choice is not None:  # its work is done when the prefill leg is
                booked = choice
                prefill_task.add_done_callback(lambda _: self.prefills.release(booked))
            decode_task = asyncio.ensure_future(self._decode(
                request, job, placed, msgspec.json.encode(body), time.perf_counter()))
            try:
                await asyncio.wait({prefill_task, decode_task},
                                   return_when=asyncio.FIRST_COMPLETED)
                if prefill_task.done() and not decode_task.done():
                    failure = _prefill_failure(prefill_task)
                    if failure is not None:
                        decode_task.cancel()
                        await asyncio.gather(decode_task, return_exceptions=True)
                        raise UpstreamError(openai_error(502, f"prefill {placed.prefill.name}"
                                                          f" failed: {failure}",
                                                          "BadGatewayError"), "prefill_failed")
                return await decode_task
            finally:
                decode_task.cancel()
                await asyncio.gather(decode_task, return_exceptions=True)
        finally:
            if prefill_task is not None:
                prefill_task.cancel()
                await asyncio.gather(prefill_task, return_exceptions=True)
            if choice is not None:
                self.prefills.release(choice)
            self.placement.release(placed)

    # -- the decode leg ---------------------------------------------------------------------
    def _placed_headers(self, job: Job, placed: Placed) -> dict[str, str]:
        m = placed.map
        where = f"map v{m.version}" if m.source == "map" else f"prior: {m.reason}"
        return {"x-request-id": job.request_id, "x-netkv-prefill": placed.prefill.name,
                "x-netkv-decode": placed.decode.name, "x-netkv-tier": placed.tier,
                "x-netkv-map": where,
                "x-netkv-predicted-ms": f"{placed.decision.ttft_s * 1e3:.1f}"}

    async def _decode(self, request: web.Request, job: Job, placed: Placed, data: bytes,
                      handover_from: float) -> web.StreamResponse:
        m = self.metrics
        key = (placed.policy, placed.tier, placed.map.source)
        child = self._decided.get(key)
        if child is None:
            child = self._decided[key] = m.decisions.labels(*key)
        child.inc()
        m.decision_time.observe(placed.decide_s)
        m.predicted.observe(placed.decision.ttft_s)
        decode = placed.decode
        headers = self._placed_headers(job, placed)
        self.upstream_open += 1
        try:
            async with self.session.post(self._url(decode, job.kind), data=data,
                                         headers=job.headers,
                                         timeout=self._decode_timeout) as resp:
                self.placement.transferred(placed)  # the KV is in (or its pull failed)
                if resp.status != 200:
                    payload = await resp.read()
                    if 400 <= resp.status < 500:
                        raise UpstreamError(web.Response(status=resp.status, body=payload,
                                                          content_type="application/json",
                                                          headers=headers), "upstream_error")
                    raise UpstreamError(openai_error(
                        502, f"decode {decode.name} answered HTTP {resp.status}: "
                        f"{payload[:200].decode(errors='replace')}", "BadGatewayError",
                        headers=headers), "decode_failed")
                headers.update((k, v) for k, v in resp.headers.items()
                               if k.lower().startswith("x-netkv-kv-"))
                if not job.stream:  # TTFT and handover are observed on streams only
                    payload = await resp.read()
                    return web.Response(body=payload, content_type="application/json",
                                        headers=headers)
                return await self._relay(request, job, placed, resp, headers=headers,
                                         handover_from=handover_from)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                self.pool.failed(decode, f"{type(exc).__name__}: {exc}", at_once=True)
            raise UpstreamError(openai_error(
                502, f"decode {decode.name} failed: {type(exc).__name__}: {exc}",
                "BadGatewayError", headers=headers), "decode_failed") from None
        finally:
            self.upstream_open -= 1

    def _first_byte(self, job: Job, placed: Placed, handover_from: float) -> None:
        now = time.perf_counter()
        self.metrics.ttft.observe(now - job.arrived)
        handover = now - handover_from
        self.metrics.handover.observe(handover)
        self.metrics.prediction_error.observe(abs(handover - placed.decision.ttft_s))

    async def _relay(self, request: web.Request, job: Job, placed: Placed,
                     resp: aiohttp.ClientResponse, *, headers: dict[str, str],
                     handover_from: float) -> web.StreamResponse:
        """Pass the decode's SSE stream through chunk by chunk."""
        out = web.StreamResponse(status=200, headers={
            **headers, "Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache"})
        await out.prepare(request)
        first = True
        outcome = "ok"
        upstream = resp.content.iter_any().__aiter__()
        while True:
            try:
                chunk = await upstream.__anext__()
            except StopAsyncIteration:
                break
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                # the decode died mid-stream: say so in-band (the status is already sent)
                outcome = "decode_failed"
                log.warning("decode stream broke", request=job.request_id,
                            decode=placed.decode.name, error=repr(exc))
                await out.write(sse({"error": {
                    "message": f"decode {placed.decode.name} failed mid-stream: "
                    f"{type(exc).__name__}", "type": "BadGatewayError", "param": None,
                    "code": 502}}))
                break
            if first:
                self._first_byte(job, placed, handover_from)
                first = False
            await out.write(chunk)
        await out.write_eof()
        job.outcome = outcome
        return out


def _prefill_failure(task: asyncio.Task[tuple[int, bytes]]) -> str | None:
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    if exc is not None:
        return f"{type(exc).__name__}: {exc}"
    status, _ = task.result()
    return None if status == 200 else f"HTTP {status}"


@web.middleware
async def _json_errors(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413) in OpenAI's shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return openai_error(exc.status, exc.reason, "InvalidRequestError"
                            if exc.status < 500 else "InternalServerError")
