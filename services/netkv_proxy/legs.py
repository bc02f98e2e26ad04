"""The two legs of every request: the prefill leg (with retries), the placement, and the
hand-over to the decode leg (:mod:`netkv_proxy.relay`).

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
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import msgspec
import structlog
from aiohttp import web

from netkv.contracts.kvtransfer import (
    KVTransferParams,
    prefill_request_params,
    push_decode_params,
)
from netkv.http.openai_errors import openai_error
from netkv_proxy.config import ProxySettings
from netkv_proxy.engineclient import EngineError
from netkv_proxy.metrics import ProxyMetrics
from netkv_proxy.placement import Placement
from netkv_proxy.prefill import PrefillChooser
from netkv_proxy.relay import DecodeLeg
from netkv_proxy.upstream import (
    PATHS,
    RETRY_STATUS,
    Answer,
    Job,
    Request,
    Upstream,
    UpstreamError,
)
from netkv_proxy.workers import Worker, WorkerPool

log = structlog.get_logger(__name__)


class Legs:
    """Runs one :class:`Job` through the prefill and the decode (:meth:`run`)."""

    def __init__(self, settings: ProxySettings, upstream: Upstream, pool: WorkerPool, *,
                 placement: Placement, prefills: PrefillChooser, metrics: ProxyMetrics
                 ) -> None:
        self.settings, self.upstream, self.pool = settings, upstream, pool
        self.placement, self.prefills, self.metrics = placement, prefills, metrics
        self.decode = DecodeLeg(upstream, pool, placement, metrics)

    async def run(self, request: Request, job: Job) -> Answer:
        if self.settings.mode == "bootstrap":
            return await self._bootstrap(request, job)
        return await self._pull(request, job)

    # -- the prefill leg --------------------------------------------------------------------
    @staticmethod
    def _prefill_body(job: Job) -> bytes:
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
        """One prefill attempt; raises TimeoutError, EngineError or OSError."""
        up = self.upstream
        worker.inflight += 1
        up.open += 1
        start = time.perf_counter()
        try:
            # the whole attempt bounded by the engine client's own timer (no asyncio.timeout)
            async with up.pool(worker).post(PATHS[job.kind], data, job.extra,
                                            max_body=self.settings.max_body_bytes,
                                            timeout=self.settings.prefill_timeout_s) as resp:
                payload = await resp.read()
            if resp.status == 200:
                seconds = time.perf_counter() - start
                worker.observe_prefill(seconds)
                self.metrics.prefill.observe(seconds)
            return resp.status, payload
        finally:
            worker.inflight -= 1
            up.open -= 1

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
            except (EngineError, OSError) as exc:
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
                    return worker, _kv_params(worker, payload)
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

    # -- the flows --------------------------------------------------------------------------
    async def _pull(self, request: Request, job: Job) -> Answer:
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
            return await self.decode.decode(request, job, placed, msgspec.json.encode(body),
                                            prefill_done)
        finally:
            self.placement.release(placed)

    async def _bootstrap(self, request: Request, job: Job) -> Answer:
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
            decode_task = asyncio.ensure_future(self.decode.decode(
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


def _prefill_failure(task: asyncio.Task[tuple[int, bytes]]) -> str | None:
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    if exc is not None:
        return f"{type(exc).__name__}: {exc}"
    status, _ = task.result()
    return None if status == 200 else f"HTTP {status}"
