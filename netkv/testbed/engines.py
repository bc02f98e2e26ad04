"""What a testbed replay records, and the socket helpers the testbed shares.

The engines themselves are :mod:`netkv.engine` (``netkv engine``: OpenAI-compatible, vLLM's
disaggregation protocol, modelled compute, real KV bytes on a TCP side channel); the testbeds
put ``netkv proxy`` in front of them (:mod:`netkv.testbed.runner`,
:mod:`netkv.testbed.workload`). This module keeps the replay's records (:class:`Request`,
:class:`Outcome`) and re-exports the compute model and the namespace-aware socket helpers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from netkv.engine.kvchannel import connect_from, listening_socket
from netkv.engine.model import EngineModel

__all__ = ["CHUNK", "EngineModel", "Outcome", "Request", "connect_from", "listening_socket"]

CHUNK = 64 * 1024  # write size of the background bulk flows


@dataclass(frozen=True, slots=True)
class Request:
    """One replayed trace request."""

    request_id: str
    arrival_s: float  # offset from the start of the replay
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...]


@dataclass(slots=True)
class Outcome:
    """What happened to one request, on one clock (seconds since the replay started)."""

    request_id: str
    prefill: str
    decode: str = ""
    policy: str = ""
    prompt_tokens: int = 0
    kv_bytes: int = 0
    arrival_s: float = 0.0
    prefill_start_s: float = 0.0
    transfer_start_s: float = 0.0
    transfer_end_s: float = 0.0
    first_token_s: float = 0.0
    predicted_ttft_s: float | None = None
    error: str | None = None
    map_source: str = ""  # the proxy's x-netkv-map: "map v<version>" or "prior: <why>"
    upstream_id: str = ""  # the request id the engines saw (the streamed chunks' id)
    # the engines' own timestamps of this request, on the replay clock: "prefill.received",
    # "prefill.compute_start", ..., "decode.first_write" (see netkv.engine.server's marks)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def transfer_s(self) -> float:
        return self.transfer_end_s - self.transfer_start_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ttft_s"] = self.ttft_s
        d["transfer_s"] = self.transfer_s
        return d
