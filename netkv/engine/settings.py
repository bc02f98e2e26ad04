"""An emulated engine's settings (``netkv engine`` flags) and its test-hook body."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from netkv.contracts.kvtransfer import DEFAULT_KV_LEASE_S
from netkv.engine.model import EngineModel
from netkv.errors import InputError
from netkv.prompts import VLLM_BLOCK_TOKENS

Role = Literal["prefill", "decode"]
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
