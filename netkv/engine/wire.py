"""An emulated engine's HTTP exchange: a completions or chat body validated into the
engine's terms (:class:`Prepared`), and what goes back: the non-streamed body, the SSE
stream, the response headers. The text is filler (no model runs here); the shapes, ids,
usage and headers are vLLM's."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from aiohttp import web

from netkv.contracts.kvtransfer import KVTransferParams
from netkv.contracts.openai import (
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
    Usage,
    decode_body,
    now_s,
    sse,
)
from netkv.engine import kvchannel
from netkv.engine.settings import DEFAULT_MAX_TOKENS, EngineSettings
from netkv.prompts import TokenCounter, render_chat

WORDS = (" the", " network", " moves", " the", " cache", " to", " the", " decoder", ",",
         " and", " the", " first", " token", " follows", ".")
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]{1,256}$")


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


def answer(prep: Prepared, n_out: int, extra: dict[str, Any] | None,
           engine_id: str) -> web.Response:
    """The non-streamed answer: ``n_out`` tokens of filler text and the usage."""
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
                        headers=headers(prep, engine_id))


def chunks(prep: Prepared, n_out: int, created: int) -> Iterator[bytes]:
    """The SSE events of a streamed answer, one per token (and the usage when asked)."""
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


def headers(prep: Prepared, engine_id: str) -> dict[str, str]:
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


def prepare(raw: bytes, kind: Literal["completion", "chat"], request_id: str | None,
            tokenizer: TokenCounter, settings: EngineSettings) -> Prepared:
    """Validate a completions or chat body into :class:`Prepared` (:class:`BodyError`
    names the field); ``request_id`` is the ``X-Request-Id`` header, if any."""
    body: CompletionRequest | ChatCompletionRequest
    if kind == "completion":
        body = decode_body(raw, CompletionRequest)
        prompt = body.prompt_value()
        limit = body.max_tokens or DEFAULT_MAX_TOKENS
    else:
        body = decode_body(raw, ChatCompletionRequest)
        prompt = render_chat([(m.role, m.text()) for m in body.messages])
        limit = body.output_limit(DEFAULT_MAX_TOKENS)
    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    if not tokens:
        raise BodyError("prompt", "is empty after tokenization", "invalid")
    if len(tokens) + limit > settings.max_model_len:
        raise BodyError("max_tokens", f"this model's maximum context length is "
                        f"{settings.max_model_len} tokens; the request has "
                        f"{len(tokens)} prompt tokens and asks for {limit} more",
                        "out_of_range")
    bootstrap = None
    if body.bootstrap_room is not None:
        if body.bootstrap_host is None or body.bootstrap_port is None:
            raise BodyError("bootstrap_host", "bootstrap_room needs bootstrap_host and "
                            "bootstrap_port", "missing_field")
        bootstrap = (body.bootstrap_host, body.bootstrap_port, body.bootstrap_room)
    rid = request_id or f"cmpl-{uuid.uuid4().hex}"
    return Prepared(kind, rid[:256], tokens, limit, body.stream,
                    bool(body.stream_options and body.stream_options.include_usage),
                    body.kv_transfer_params, bootstrap,
                    body.model or settings.model_name)


async def stream(request: web.Request, prep: Prepared, n_out: int, step: float, *,
                 every: int, engine_id: str,
                 on_first: Callable[[], None]) -> web.StreamResponse:
    """Stream ``n_out`` tokens, ``step`` seconds apart, ``every`` per write (the first at once,
    then ``on_first`` is called); the generation time is slept, not spun."""
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        **headers(prep, engine_id)})
    await resp.prepare(request)
    created = now_s()
    buf: list[bytes] = []
    owed = 0.0  # generation time of the tokens in buf, not yet slept
    for i, chunk in enumerate(chunks(prep, n_out, created)):
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
                on_first()
    if owed:
        await asyncio.sleep(owed)
    await resp.write(b"".join(buf) + SSE_DONE)
    await resp.write_eof()
    return resp
