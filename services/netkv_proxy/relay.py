"""The decode leg: send the body to the placed decode and pass its answer to the client, the
whole JSON answer or its SSE stream chunk by chunk. A decode that fails before answering is a
502 in OpenAI's shape; one that dies mid-stream is said in-band (the status is already sent).
Answers say where they went (``x-netkv-prefill``, ``x-netkv-decode``, ``x-netkv-tier``,
``x-netkv-predicted-ms``, ``x-netkv-map``) and pass on the decode's ``x-netkv-kv-*``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from aiohttp import web

from netkv.contracts.openai import sse
from netkv.http.h1 import H1Request, H1Stream
from netkv.http.openai_errors import openai_error
from netkv_proxy.engineclient import EngineConnectError, EngineError, Response
from netkv_proxy.metrics import ProxyMetrics
from netkv_proxy.placement import Placed, Placement
from netkv_proxy.upstream import PATHS, Answer, Job, Request, Upstream, UpstreamError
from netkv_proxy.workers import WorkerPool

log = structlog.get_logger(__name__)


def placed_headers(job: Job, placed: Placed) -> dict[str, str]:
    m = placed.map
    where = f"map v{m.version}" if m.source == "map" else f"prior: {m.reason}"
    return {"x-request-id": job.request_id, "x-netkv-prefill": placed.prefill.name,
            "x-netkv-decode": placed.decode.name, "x-netkv-tier": placed.tier,
            "x-netkv-map": where,
            "x-netkv-predicted-ms": f"{placed.decision.ttft_s * 1e3:.1f}"}


class DecodeLeg:
    def __init__(self, upstream: Upstream, pool: WorkerPool, placement: Placement,
                 metrics: ProxyMetrics) -> None:
        self.upstream, self.pool, self.metrics = upstream, pool, metrics
        s = upstream.settings
        self.read_timeout_s, self.max_body = s.decode_read_timeout_s, s.max_body_bytes
        self.placement = placement
        self._decided: dict[tuple[str, str, str], Any] = {}  # metric children by labels

    def _record(self, placed: Placed) -> None:
        m = self.metrics
        key = (placed.policy, placed.tier, placed.map.source)
        child = self._decided.get(key)
        if child is None:
            child = self._decided[key] = m.decisions.labels(*key)
        child.inc()
        m.decision_time.observe(placed.decide_s)
        m.predicted.observe(placed.decision.ttft_s)

    async def decode(self, request: Request, job: Job, placed: Placed, data: bytes,
                     handover_from: float) -> Answer:
        # The decision's metrics are bookkeeping, not on the request's path: recorded on the
        # loop's next turn, i.e. while the decode engine works on the request sent below
        asyncio.get_running_loop().call_soon(self._record, placed)
        decode = placed.decode
        headers = placed_headers(job, placed)
        up = self.upstream
        up.open += 1
        try:
            async with up.pool(decode).post(PATHS[job.kind], data, job.extra,
                                            read_timeout=self.read_timeout_s,
                                            max_body=self.max_body) as resp:
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
                               if k.startswith("x-netkv-kv-"))  # names are lower-case
                if not job.stream:  # TTFT and handover are observed on streams only
                    payload = await resp.read()
                    return web.Response(body=payload, content_type="application/json",
                                        headers=headers)
                return await self._relay(request, job, placed, resp, headers=headers,
                                         handover_from=handover_from)
        except (EngineError, OSError, TimeoutError) as exc:
            if isinstance(exc, EngineConnectError):
                self.pool.failed(decode, f"{type(exc).__name__}: {exc}", at_once=True)
            raise UpstreamError(openai_error(
                502, f"decode {decode.name} failed: {type(exc).__name__}: {exc}",
                "BadGatewayError", headers=headers), "decode_failed") from None
        finally:
            up.open -= 1

    def _first_byte(self, job: Job, placed: Placed, handover_from: float) -> None:
        now = time.perf_counter()
        self.metrics.ttft.observe(now - job.arrived)
        handover = now - handover_from
        self.metrics.handover.observe(handover)
        self.metrics.prediction_error.observe(abs(handover - placed.decision.ttft_s))

    async def _relay(self, request: Request, job: Job, placed: Placed,
                     resp: Response, *, headers: dict[str, str],
                     handover_from: float) -> Answer:
        """Pass the decode's SSE stream through chunk by chunk."""
        headers = {**headers, "Content-Type": resp.headers.get("content-type",
                                                               "text/event-stream"),
                   "Cache-Control": "no-cache"}
        out: web.StreamResponse | H1Stream
        if isinstance(request, H1Request):
            out = await request.stream(200, headers)
        else:
            out = web.StreamResponse(status=200, headers=headers)
            await out.prepare(request)
        first = True
        outcome = "ok"
        while True:
            try:
                chunk = await resp.chunk()
            except (EngineError, OSError, TimeoutError) as exc:
                # the decode died mid-stream: say so in-band (the status is already sent)
                outcome = "decode_failed"
                log.warning("decode stream broke", request=job.request_id,
                            decode=placed.decode.name, error=repr(exc))
                await out.write(sse({"error": {
                    "message": f"decode {placed.decode.name} failed mid-stream: "
                    f"{type(exc).__name__}", "type": "BadGatewayError", "param": None,
                    "code": 502}}))
                break
            if chunk is None:
                break
            if first:
                self._first_byte(job, placed, handover_from)
                first = False
            await out.write(chunk)
        await out.write_eof()
        job.outcome = outcome
        return out
