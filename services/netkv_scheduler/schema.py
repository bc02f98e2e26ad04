"""The scheduler's HTTP answers, one msgspec Struct each (requests: :mod:`netkv.routing.requests`).

The OpenAPI document at ``/openapi.json`` is generated from these and the request Structs
(:mod:`netkv.http.openapi`); nothing is written twice.
"""

from __future__ import annotations

import msgspec


class Breakdown(msgspec.Struct):
    queue_ms: float
    transfer_ms: float
    first_token_ms: float


class SelectResponse(msgspec.Struct):
    """The decision: which decoder (and prefill: ``netkv_pair`` may choose it), why, and
    which map it came from."""

    request_id: str
    decode: str
    decode_host: str
    prefill: str
    predicted_ttft_ms: float
    breakdown: Breakdown
    tier: int
    kv_bytes: float
    map_version: int | None
    map_age_ms: float | None
    map_stale: bool
    policy: str
    reserved: bool


class ReleaseResponse(msgspec.Struct):
    request_id: str
    released: bool
    decode: str | None


class RegisterResponse(msgspec.Struct):
    name: str
    role: str
    host: str
    source: str
    expires_in_s: float | None = None  # registered instances expire unless refreshed


class RemoveResponse(msgspec.Struct):
    name: str
    removed: bool


class InstanceEntry(msgspec.Struct, omit_defaults=True):
    """One instance; load fields for decoders only. A scrape error is a short category
    (``timeout``, ``http 404``, ``too large``, ...), never the scraped body."""

    name: str
    role: str
    host: str
    source: str
    running: float | msgspec.UnsetType = msgspec.UNSET
    waiting: float | msgspec.UnsetType = msgspec.UNSET
    kv_use: float | msgspec.UnsetType = msgspec.UNSET
    capacity_tokens: float | msgspec.UnsetType | None = msgspec.UNSET
    reservations: int | msgspec.UnsetType = msgspec.UNSET
    scraped: bool | msgspec.UnsetType = msgspec.UNSET
    scrape_error: str | msgspec.UnsetType | None = msgspec.UNSET
    load_age_s: float | msgspec.UnsetType = msgspec.UNSET
    expires_in_s: float | msgspec.UnsetType = msgspec.UNSET


class InstancesResponse(msgspec.Struct):
    instances: list[InstanceEntry]
    open_reservations: int
    transfers_in_flight: int
    expired_total: int
    released_total: int


class ReadyResponse(msgspec.Struct):
    """``ready``, ``degraded`` (answering, with reasons) or ``not ready`` (no map yet)."""

    status: str
    reasons: list[str]
    map_version: int | None
    map_age_s: float | None
    map_stale: bool
    mqtt_connected: bool
    redis_ok: bool | None
    feed_alive: bool = True
    silent_agents: list[str] = msgspec.field(default_factory=list)


class HealthResponse(msgspec.Struct):
    status: str
