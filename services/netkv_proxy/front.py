"""The OpenAI-compatible front: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

A body is read within ``body_timeout_s`` (else 408), validated with the one typed definition
of :mod:`netkv.contracts.openai` (a bad one is a 400 naming the field, counted by reason),
turned into a :class:`~netkv_proxy.upstream.Job` (prompt tokens, prefix block hashes, output
limit) and handed to the legs. Errors are in OpenAI's shape; ``x-request-id`` (the client's,
or a new one) goes to both legs and back. Every request is counted by endpoint and outcome.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from netkv.contracts.openai import BodyError, ChatCompletionRequest, CompletionRequest, decode_body
from netkv.http.openai_errors import openai_error
from netkv.prompts import (
    ApproxTokenizer,
    TokenCounter,
    block_hashes,
    block_hashes_of_bytes,
    render_chat,
)
from netkv_proxy.config import ProxySettings
from netkv_proxy.engineclient import header_block
from netkv_proxy.metrics import ProxyMetrics
from netkv_proxy.upstream import Answer, Job, Kind, Request, UpstreamError

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,256}$")
_RAW_BODY = dict[str, msgspec.Raw]

Dispatch = Callable[[Request, Job], Awaitable[Answer]]


class BodyTimeoutError(Exception):
    """The client's body did not arrive within ``body_timeout_s``."""


class Front:
    """The completion routes; ``dispatch`` runs a parsed job through the legs."""

    def __init__(self, settings: ProxySettings, tokenizer: TokenCounter,
                 metrics: ProxyMetrics, dispatch: Dispatch) -> None:
        self.settings, self.tokenizer, self.metrics = settings, tokenizer, metrics
        self.dispatch = dispatch
        self._counted: dict[tuple[str, str], Any] = {}  # metric children by labels
        # New request ids: 64 random bits per process, then a counter (32 hex digits, as
        # uuid4().hex was, without a getrandom call per request)
        self._id_prefix = f"netkv-{secrets.token_hex(8)}"
        self._ids = itertools.count()

    def count(self, endpoint: str, outcome: str) -> None:
        child = self._counted.get((endpoint, outcome))
        if child is None:
            child = self._counted[(endpoint, outcome)] = self.metrics.requests.labels(
                endpoint, outcome)
        child.inc()

    async def completions(self, request: Request) -> Answer:
        return await self._handle(request, "completion")

    async def chat(self, request: Request) -> Answer:
        return await self._handle(request, "chat")

    def _job(self, request: Request, raw: bytes, kind: Kind, rid: str) -> Job:
        typed: CompletionRequest | ChatCompletionRequest
        if kind == "completion":
            typed = decode_body(raw, CompletionRequest)
            prompt = typed.prompt_value()
            limit = typed.max_tokens or self.settings.default_max_tokens
        else:
            typed = decode_body(raw, ChatCompletionRequest)
            prompt = render_chat([(m.role, m.text()) for m in typed.messages])
            limit = typed.output_limit(self.settings.default_max_tokens)
        if isinstance(prompt, str) and isinstance(self.tokenizer, ApproxTokenizer):
            # the approximation's ids straight as the bytes the hashes read (no list of ints)
            ids = self.tokenizer.encode_bytes(prompt)
            count, hashes = len(ids) // 4, block_hashes_of_bytes(ids, self.settings.block_size)
        else:
            tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            count, hashes = len(tokens), block_hashes(tokens, self.settings.block_size)
        # The body the legs pass on, shallow: each value kept as its raw JSON text (the
        # typed decode above validated it). Re-encoding splices the bytes, so a prompt of
        # 8k token ids costs ~50 us to scan here and ~1 us per leg to encode, not ~180 us
        # to build as Python objects and ~40 us per leg to encode again.
        try:
            body: dict[str, Any] = msgspec.json.decode(raw, type=_RAW_BODY)
        except msgspec.ValidationError:
            raise BodyError("body", "must be a JSON object", "wrong_type") from None
        # the request id is printable ASCII (checked in _handle, or made there)
        extra = b"X-Request-Id: " + rid.encode("ascii") + b"\r\n"
        auth = request.headers.get("Authorization")
        if auth:
            try:
                extra += header_block({"Authorization": auth})
            except ValueError:
                raise BodyError("Authorization", "must be one line of header text",
                                "wrong_type") from None
        return Job(kind, rid, body, count, hashes, limit, typed.stream, extra,
                   time.perf_counter(),
                   "completions" if kind == "completion" else "chat")

    async def _handle(self, request: Request, kind: Kind) -> Answer:
        arrived = time.perf_counter()
        given = request.headers.get("X-Request-Id", "")
        rid = given if given and _REQUEST_ID.match(given) else \
            f"{self._id_prefix}{next(self._ids):016x}"
        endpoint = "completions" if kind == "completion" else "chat"
        try:
            job = self._job(request, await self._read(request), kind, rid)
        except BodyError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            self.count(endpoint, "bad_request")
            return openai_error(400, exc.message, "BadRequestError", param=exc.field,
                                headers={"x-request-id": rid})
        except BodyTimeoutError:
            self.count(endpoint, "bad_request")
            return openai_error(408, f"body not received within "
                                f"{self.settings.body_timeout_s:g} s", "RequestTimeoutError",
                                param="body", headers={"x-request-id": rid,
                                                       "Connection": "close"})
        job.arrived = arrived
        outcome = "cancelled"
        try:
            response = await self.dispatch(request, job)
            outcome = job.outcome
            return response
        except UpstreamError as exc:
            outcome = exc.outcome
            exc.response.headers["x-request-id"] = rid
            return exc.response
        finally:
            # counted on the loop's next turn: after the front has written the answer (both
            # write it in this same step), before any other request is read
            asyncio.get_running_loop().call_soon(self.count, endpoint, outcome)

    async def _read(self, request: Request) -> bytes:
        """The body, within ``body_timeout_s`` (a trickled body is a 408)."""
        if request.content.is_eof():  # it all came with the head: no timer needed
            return await request.read()
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                return await request.read()
        except TimeoutError:
            raise BodyTimeoutError from None


@web.middleware
async def json_errors(request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
    """aiohttp's own errors (404, 405, 413) in OpenAI's shape (the h1 front raises the same
    ``HTTPException`` classes; typed ``Any`` to serve as the middleware of both)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return openai_error(exc.status, exc.reason, "InvalidRequestError"
                            if exc.status < 500 else "InternalServerError")
