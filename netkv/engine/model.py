"""The modelled compute of an emulated engine (real seconds) and its KV size per token."""

from __future__ import annotations

from dataclasses import dataclass, field

from netkv.fields import bound


@dataclass(frozen=True, slots=True)
class EngineModel:
    """Modelled compute and KV size. Defaults are choices for the testbeds, stated here:
    32k prompt tokens/s of prefill plus 20 ms overhead, 30 ms until the first decoded token
    once the KV is in, 2 ms per further token, 8 concurrent decodes, 320 KiB of KV per token
    (a 70B-class model in FP16 with GQA) before the testbed's scaling."""

    prefill_tokens_per_s: float = field(default=32000.0, metadata=bound(gt=0))
    prefill_overhead_s: float = field(default=0.02, metadata=bound(ge=0))
    decode_step_s: float = field(default=0.03, metadata=bound(ge=0))
    tpot_s: float = field(default=0.002, metadata=bound(ge=0))
    max_decode_hold_s: float = field(default=3.0, metadata=bound(ge=0))
    decode_slots: int = field(default=8, metadata=bound(ge=1))
    bytes_per_token: float = field(default=327680.0, metadata=bound(gt=0))  # as moved
    capacity_tokens: float = field(default=500_000.0, metadata=bound(gt=0))  # KV memory

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_overhead_s + tokens / self.prefill_tokens_per_s

    def kv_bytes(self, tokens: int) -> int:
        return max(0, round(tokens * self.bytes_per_token))
