"""What a router asks for: one typed definition of a decode-selection request.

The scheduler's ``POST /v1/select`` body decodes straight into :class:`SelectRequest` (the
OpenAPI schema is generated from it), and an in-process router (the P/D proxy) builds one
directly, so the defaults and bounds live here and nowhere else.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

MAX_ID_LENGTH = 256
MAX_PROMPT_TOKENS = 10_000_000
MAX_HASH = 2**63 - 1

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
BlockHash = Annotated[int, msgspec.Meta(ge=0, le=MAX_HASH)]


class SelectRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Choose the decode instance for one request (and book it unless ``reserve`` is off)."""

    request_id: Annotated[str, msgspec.Meta(
        min_length=1, max_length=MAX_ID_LENGTH,
        description="the router's id; reservations are keyed by it")]
    prefill: Annotated[str, msgspec.Meta(
        min_length=1, max_length=MAX_ID_LENGTH,
        description="the prefill instance that computes the KV cache")]
    prompt_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_PROMPT_TOKENS)]
    output_tokens: Annotated[int, msgspec.Meta(
        ge=0, le=MAX_PROMPT_TOKENS,
        description="tokens the decoder must reserve for the answer")] = 0
    block_hashes: Annotated[tuple[BlockHash, ...], msgspec.Meta(
        description="prefix block hashes (for cache-aware policies)")] = ()
    policy: Annotated[str | None, msgspec.Meta(
        description="a registered policy name (default: the configured one)")] = None
    reserve: Annotated[bool, msgspec.Meta(
        description="book the decoder until release or expiry")] = True


class ReleaseRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """End the booking of one request (idempotent)."""

    request_id: Id


Gauge = Annotated[float, msgspec.Meta(ge=0, le=1e6)]


class InstanceReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Register an instance on a known host, or refresh a known one's load and scrape URL."""

    name: Id
    role: Literal["prefill", "decode"] | None = None
    host: Id | None = None
    running: Gauge | None = None
    waiting: Gauge | None = None
    kv_use: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    capacity_tokens: Annotated[float, msgspec.Meta(
        ge=1, le=1e12, description="KV memory of a decoder, in tokens")] | None = None
    metrics_url: Annotated[str, msgspec.Meta(
        max_length=2048, pattern="^https?://[^\\s]+$")] | None = None
