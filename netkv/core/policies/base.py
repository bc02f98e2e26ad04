"""The policy protocol, the shared parameter parsing and tie-breaking helpers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from netkv.core.costmodel import CostOracle
from netkv.core.policies.bookings import Bookings
from netkv.core.policies.prediction import Prediction
from netkv.core.policies.views import CandidateView, Decision, RequestView
from netkv.core.topology import BoolArray, FloatArray
from netkv.errors import InputError
from netkv.fields import from_mapping

P = TypeVar("P")


@runtime_checkable
class DecodePolicy(Protocol):
    """Chooses a decode instance. Pure and synchronous; may keep its own small state
    (a round-robin counter, a seeded tie-break generator), never does I/O or timing."""

    name: str

    def decide(self, request: RequestView, candidates: CandidateView, oracle: CostOracle,
               bookings: Bookings | None = None) -> Decision: ...


def parse_params(cls: type[P], params: Mapping[str, Any] | None, policy: str) -> P:
    """Strictly parse a policy's parameters; errors name ``policies.<name>.<param>``."""
    return from_mapping(cls, dict(params or {}), f"policies.{policy}")


class TieBreaker:
    """argmin with ties broken by a seeded generator, so equal candidates share the load."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def argmin(self, values: FloatArray, scratch: BoolArray | None = None) -> int:
        """``scratch`` (bool, the shape of ``values``) spares a hot caller an allocation."""
        first = int(values.argmin())
        best = float(values.item(first))
        limit = best + 1e-12 * max(abs(best), 1.0)
        tied = np.less_equal(values, limit, out=scratch)
        if np.count_nonzero(tied) == 1:  # the common case: no tie
            return first
        ties = np.flatnonzero(tied)
        return int(ties[self.rng.integers(ties.shape[0])])


def decision_from(pred: Prediction, at: int, chosen: int, scores: FloatArray | None,
                  **extra: Any) -> Decision:
    """A Decision for candidate ``chosen`` whose prediction sits at position ``at``."""
    queue = float(pred.queue_s.item(at))
    transfer = float(pred.transfer_s.item(at))
    first = float(pred.first_token_s.item(at))
    return Decision(
        index=chosen,
        ttft_s=queue + transfer + first,
        queue_s=queue,
        transfer_s=transfer,
        first_token_s=first,
        tier=int(pred.tier.item(at)),
        transfer_bytes=float(pred.transfer_bytes.item(at)),
        scores=scores,
        **extra,
    )


def require_overlap(request: RequestView, n: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """The request's per-candidate overlap, zeros when the owner has no prefix index."""
    if request.overlap_blocks is None:
        return np.zeros(n, dtype=np.int64)
    if request.overlap_blocks.shape != (n,):
        raise InputError("overlap_blocks", f"expected {n} values, got "
                         f"{request.overlap_blocks.shape}")
    return request.overlap_blocks
