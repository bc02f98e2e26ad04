"""The replays' client: one trace request streamed through a router, timed at its first token.

Used by the policy replay (:mod:`netkv.testbed.runner`, through ``netkv proxy``), the compose
workload (:mod:`netkv.testbed.workload`) and the router comparison
(:mod:`netkv.testbed.compare`, through NetKV's proxy and the peers). What they really differ in
is a parameter each:

* ``clock``: the replay's clock (``time.monotonic`` for the policy replay, the event loop's
  ``time`` for the comparison: the same monotonic clock in asyncio's loop); every time
  recorded is ``clock() - t0``.
* ``first_token``: what ends the TTFT measurement (see :data:`FirstToken`).
* ``names``: engine ``host:port`` -> instance name, for a router that says only addresses.

Who served a request and how long its KV took are read by :func:`identify` from the answer's
headers and its first streamed line, for every router.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import aiohttp
import msgspec
import structlog

from netkv.testbed.engines import Outcome, Request

log = structlog.get_logger(__name__)

MODEL_NAME = "netkv/emulated"
VLLM_ROUTER_ID = "___prefill_addr_"

FirstToken = Literal["chunk", "line"]
"""What TTFT is timed at: ``"chunk"``, the first body bytes the router passes on (aiohttp's
``readany``; the policy replay and the compose workload); ``"line"``, the first complete SSE
line (``readline``; the router comparison, which also reads the chunk's id from it)."""


async def stream_request(http: aiohttp.ClientSession, url: str, req: Request, *,
                         prompt: list[int], policy: str, t0: float,
                         clock: Callable[[], float] = time.monotonic,
                         first_token: FirstToken = "chunk",
                         names: Mapping[str, str] | None = None) -> Outcome:
    """One replayed request (``POST url/v1/completions``, streamed), recorded under
    ``policy`` (a policy or router label). Times are seconds since ``t0`` on ``clock``,
    which must be this host's monotonic clock: the engines' ``x-netkv-kv-*`` headers use it
    (containers on one kernel share it). Arrival is taken just before the request is sent;
    the first token as ``first_token`` says. A failed request is an outcome with ``error``
    set, never an exception."""
    body = msgspec.json.encode({"model": MODEL_NAME, "prompt": prompt,
                                "max_tokens": max(req.output_tokens, 1), "stream": True})
    out = Outcome(req.request_id, "", policy=policy, prompt_tokens=req.prompt_tokens,
                  arrival_s=clock() - t0)
    out.prefill_start_s = out.arrival_s
    try:
        async with http.post(url + "/v1/completions", data=body, headers={
                "Content-Type": "application/json",
                "x-request-id": f"{policy}-{req.request_id}"}) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return out
            if first_token == "line":
                first = await resp.content.readline()
            else:
                first = await resp.content.readany()
            out.first_token_s = clock() - t0
            identify(out, resp.headers, first, names or {}, t0)
            async for _ in resp.content.iter_any():
                pass  # the rest of the answer (the booking ends with it)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        log.warning("testbed.request_failed", policy=policy, request=req.request_id,
                    error=out.error)
    return out


def identify(out: Outcome, headers: Any, first_line: bytes, names: Mapping[str, str],
             t0: float) -> None:
    """Who served a request and how long its KV took; ``t0`` is the replay clock's zero on
    the engines' monotonic clock. The pair comes from the proxy's ``x-netkv-prefill`` /
    ``x-netkv-decode``, else from vllm-router's request id (``___prefill_addr_<a>___decode_
    addr_<b>_<uuid>``, the id of every streamed chunk), else from the engines'
    ``x-netkv-kv-from`` / ``x-netkv-engine``; an unknown pair stays empty, never guessed."""
    out.prefill = headers.get("x-netkv-prefill", "") or headers.get("x-netkv-kv-from", "")
    out.decode = headers.get("x-netkv-decode", "") or headers.get("x-netkv-engine", "")
    rid = out.upstream_id = _chunk_id(first_line)
    if not (out.prefill and out.decode) and rid.startswith(VLLM_ROUTER_ID):
        p_addr, _, rest = rid[len(VLLM_ROUTER_ID):].partition("___decode_addr_")
        out.prefill = names.get(p_addr, "")
        out.decode = names.get(rest.rsplit("_", 1)[0], "")
    if out.prefill in names:  # an address (x-netkv-kv-from in bootstrap mode)
        out.prefill = names[out.prefill]
    predicted = headers.get("x-netkv-predicted-ms")
    if predicted:
        with contextlib.suppress(ValueError):
            out.predicted_ttft_s = float(predicted) / 1e3
    out.map_source = headers.get("x-netkv-map", "")
    if "x-netkv-kv-bytes" in headers:
        out.kv_bytes = int(headers["x-netkv-kv-bytes"])
        out.transfer_start_s = float(headers["x-netkv-kv-start"]) - t0
        out.transfer_end_s = float(headers["x-netkv-kv-end"]) - t0


def _chunk_id(line: bytes) -> str:
    text = line.decode(errors="replace").strip()
    if not text.startswith("data:"):
        return ""
    try:
        data = json.loads(text[5:])
    except ValueError:
        return ""
    return str(data.get("id", "")) if isinstance(data, dict) else ""
