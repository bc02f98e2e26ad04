"""The OpenAI-compatible HTTP bodies NetKV's engines and proxy accept and send.

One msgspec definition per body. Requests are validated at the edge with :func:`decode_body`,
which turns msgspec's message into a :class:`BodyError` naming the field (``max_tokens``,
``messages[0].role``) and a short ``reason`` for the metric that counts rejections. Unknown
fields are allowed (clients send many; a proxy forwards them untouched from the raw body).

Streaming answers are Server-Sent Events: ``data: <chunk JSON>\\n\\n`` per chunk, ending with
``data: [DONE]\\n\\n``, as OpenAI and vLLM send them.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal, NoReturn, TypeVar, cast

import msgspec

from netkv.contracts.kvtransfer import MAX_BOOTSTRAP_ROOM, KVTransferParams, Port

Tokens = Annotated[int, msgspec.Meta(ge=1, le=10_000_000)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=(1 << 31) - 1)]
# A prompt of token ids is recognised by the set of its element types (msgspec decodes a JSON
# integer to exactly ``int``): one C-level pass. A generator of isinstance() calls plus a
# copy took ~1.3 ms on a 12k-token prompt, paid per request by the proxy and by both engines.
_INT = frozenset({int})
Room = Annotated[int, msgspec.Meta(ge=0, le=MAX_BOOTSTRAP_ROOM)]
MAX_BODY_BYTES = 32 << 20  # a 1M-token prompt given as ids fits


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    """Fields both request kinds share (the ones NetKV reads)."""

    model: str | None = None
    max_tokens: Tokens | None = None
    min_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1  # one choice per request is supported
    kv_transfer_params: KVTransferParams | None = None
    # SGLang's bootstrap (the decode meets the prefill at bootstrap_host:bootstrap_port)
    bootstrap_host: str | None = None
    bootstrap_port: Port | None = None
    bootstrap_room: Room | None = None


class CompletionRequest(_Common, kw_only=True):
    """``POST /v1/completions``. ``prompt``: a string, token ids, or a one-element batch
    of either (NetKV serves one prompt per request)."""

    prompt: str | list[str | TokenId | list[TokenId]]

    def prompt_value(self) -> str | list[int]:
        """The one prompt as text or token ids; raises :class:`BodyError` otherwise."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise BodyError("prompt", "must not be empty", "invalid")
        if set(map(type, p)) == _INT:  # token ids: one C-level pass, no copy (see below)
            return cast("list[int]", p)
        if len(p) == 1 and isinstance(p[0], str):
            return p[0]
        if len(p) == 1 and isinstance(p[0], list):
            if not p[0]:
                raise BodyError("prompt[0]", "must not be empty", "invalid")
            return list(p[0])
        raise BodyError("prompt", "give one prompt: a string, a list of token ids, or a "
                        "one-element list of either (batches are not supported)", "invalid")


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class ChatCompletionRequest(_Common, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: Tokens | None = None

    def output_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


# -- answers ------------------------------------------------------------------------------
class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"] | None


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason = None


class Completion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    kv_transfer_params: dict[str, Any] | None = None


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    kv_transfer_params: dict[str, Any] | None = None


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "netkv"


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


# -- decoding at the edge -----------------------------------------------------------------
class BodyError(ValueError):
    """A request body NetKV cannot serve: ``field`` names it, ``reason`` is the metric label
    (``not_json``, ``wrong_type``, ``missing_field``, ``out_of_range``, ``invalid``,
    ``too_large``)."""

    def __init__(self, field: str, message: str, reason: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.reason = field, message, reason


BODY_ERROR_REASONS = ("not_json", "wrong_type", "missing_field", "out_of_range", "invalid",
                      "too_large")
T = TypeVar("T")
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"Object missing required field `(?P<name>[^`]+)`")
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _path(raw: str) -> str:
    return re.sub(r"^\.", "", raw) or "body"


def decode_body(data: bytes, kind: type[T]) -> T:
    """Validate a JSON body as ``kind``; raise :class:`BodyError` naming the bad field."""
    if len(data) > MAX_BODY_BYTES:
        raise BodyError("body", f"larger than {MAX_BODY_BYTES} bytes", "too_large")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        out: T = decoder.decode(data)
        return out
    except msgspec.ValidationError as exc:
        text = str(exc)
        at = _AT.search(text)
        where = _path(at.group("path")) if at else ""
        head = _AT.sub("", text)
        missing = _MISSING.match(head)
        if missing:
            name = missing.group("name")
            _raise(f"{where}.{name}" if where and where != "body" else name,
                          "is required", "missing_field")
        reason = "out_of_range" if any(op in head for op in (">=", "<=", "length")) \
            else "wrong_type" if head.startswith("Expected") else "invalid"
        _raise(where or "body", head, reason)
    except msgspec.DecodeError as exc:
        raise BodyError("body", f"not valid JSON: {exc}", "not_json") from None


def _raise(field: str, message: str, reason: str) -> NoReturn:
    raise BodyError(field, message, reason)


def error_body(message: str, type_: str, *, param: str | None = None,
               code: int | str | None = None) -> bytes:
    return msgspec.json.encode(ErrorResponse(error=ErrorDetail(
        message=message, type=type_, param=param, code=code)))


def now_s() -> int:
    return int(time.time())


SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: msgspec.Struct | dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"
