"""What a policy sees and what it returns: a request, the decode candidates, a decision.

Views are plain arrays over candidates so that a policy is a handful of numpy operations,
O(|D|) with a small constant, whatever owns the state (the scheduler service, the simulator or
a testbed). Building a view is the owner's job; validation of external input happens at the
owner's edge, so the views only check shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from netkv.core.prefix_cache import BLOCK_TOKENS
from netkv.core.topology import FloatArray, IntArray


@dataclass(frozen=True, slots=True)
class PrefillView:
    """Prefill candidates for a joint choice (``netkv_pair``).

    ``ready_s[i]`` is the predicted time from now until prefill instance ``i`` would have this
    request's KV ready (its queue plus its compute, given its own prefix-cache hit);
    ``compute_s[i]`` (optional) the compute part alone, which a layer-wise streamed transfer
    can overlap (see ``RequestView.stream_layers``); ``nic_bytes_s[i]`` (optional) the rate
    of the NICs instance ``i`` is bound to.
    """

    host: IntArray
    ready_s: FloatArray
    compute_s: FloatArray | None = None
    nic_bytes_s: FloatArray | None = None

    def __post_init__(self) -> None:
        if self.host.ndim != 1 or self.host.shape != self.ready_s.shape or self.host.size == 0:
            raise ValueError("PrefillView: host and ready_s must be equal-length, non-empty 1-d")


@dataclass(frozen=True, slots=True)
class RequestView:
    """One request to place.

    ``overlap_blocks[i]`` is how many leading prefix blocks (``block_tokens`` tokens each) of
    this prompt decode candidate ``i`` already holds: only the rest is transferred (delta
    transfer). ``output_tokens`` is what the decoder must reserve for the answer (max_tokens
    or an expectation; 0 if unknown). ``stream_layers`` > 0 says the KV will be streamed layer
    by layer while prefill computes for ``prefill_compute_s`` (pair chosen before prefill),
    so only the part of the transfer prefill cannot hide counts; 0 (default) is a pull after
    prefill. ``src_nic_bytes_s`` (0: unknown) is the rate of the NICs the prefill instance is
    bound to: a transfer off its host cannot go faster (its host's other NICs belong to other
    instances). ``src_nic_booked_bytes``/``src_nic_booked_flows``: the transfers this
    scheduler has booked out of that prefill instance's NICs and not yet seen land (bytes at
    booking, count); they share those NICs with this one.
    """

    prefill_host: int
    prompt_tokens: int
    kv_bytes_per_token: float
    overlap_blocks: IntArray | None = None
    block_tokens: int = BLOCK_TOKENS
    output_tokens: int = 0
    prefill: PrefillView | None = None
    stream_layers: int = 0
    prefill_compute_s: float = 0.0
    src_nic_bytes_s: float = 0.0
    src_nic_booked_bytes: float = 0.0
    src_nic_booked_flows: float = 0.0

    @property
    def prompt_blocks(self) -> int:
        return -(-self.prompt_tokens // self.block_tokens)

    def delta_tokens(self, n: int) -> FloatArray:
        """Per candidate: prompt tokens the decoder lacks (all of them without overlap)."""
        if self.overlap_blocks is None:
            return np.full(n, float(self.prompt_tokens))
        held = np.minimum(self.overlap_blocks * self.block_tokens, self.prompt_tokens)
        out: FloatArray = (self.prompt_tokens - held).astype(np.float64)
        return out


@dataclass(frozen=True, slots=True)
class CandidateView:
    """The decode instances, one entry per candidate.

    ``running``/``waiting`` are requests in the batch and in the admission queue, counted the
    way a router does (including the ones it has just sent); ``kv_use`` is the fraction of KV
    memory in use; ``capacity_tokens`` the KV memory in tokens. ``tbt_s`` (current time per
    output token) and ``waiting_tokens`` (KV tokens the admission queue will claim) are
    optional: a policy falls back to its own defaults without them; so is ``nic_bytes_s``, the
    rate of the NICs each decoder is bound to (a transfer from another host cannot beat it),
    and ``nic_booked_bytes``/``nic_booked_flows``, the transfers this scheduler has booked
    into each decoder's NICs and not yet seen land (bytes at booking, count).

    ``cache`` holds what policies derive from ``host`` alone (per source host: the candidates'
    path links, their rows of a caching oracle), so an owner that keeps one view across
    decisions, updating the load arrays in place, pays for those gathers once. ``host`` must
    therefore not change in place while a view is in use: build a new view instead.
    """

    host: IntArray
    running: IntArray
    waiting: IntArray
    kv_use: FloatArray
    capacity_tokens: FloatArray
    tbt_s: FloatArray | None = None
    waiting_tokens: FloatArray | None = None
    nic_bytes_s: FloatArray | None = None
    nic_booked_bytes: FloatArray | None = None
    nic_booked_flows: FloatArray | None = None
    cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.host.shape
        if self.host.ndim != 1 or n[0] == 0:
            raise ValueError("CandidateView: host must be a non-empty 1-d array")
        for name in ("running", "waiting", "kv_use", "capacity_tokens", "tbt_s",
                     "waiting_tokens", "nic_bytes_s", "nic_booked_bytes", "nic_booked_flows"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != n:
                raise ValueError(f"CandidateView: {name} has shape {arr.shape}, expected {n}")

    def __len__(self) -> int:
        return int(self.host.shape[0])


@dataclass(slots=True)
class Decision:
    """The chosen decode candidate (an index into the view) and the predicted TTFT parts
    (never changed once made; not frozen: a frozen init of its ten fields costs about 1.7 µs,
    paid by every decision of the scheduler and the simulator).

    ``ttft_s = queue_s + transfer_s + first_token_s`` counts from when the KV is ready at the
    prefill instance; ``prefill_s`` (joint choice only) is the predicted wait until then.
    ``scores`` are the policy's objective per candidate, lower is better (weighted-sum
    policies return the negated score), or ``None`` if the policy has none.
    """

    index: int
    ttft_s: float
    queue_s: float
    transfer_s: float
    first_token_s: float
    tier: int
    transfer_bytes: float
    prefill_index: int | None = None
    prefill_s: float = 0.0
    scores: FloatArray | None = None
