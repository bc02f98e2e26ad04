"""Max-min fair rates for many flows by progressive filling (the fabric's large case).

:func:`fill_vectorised`: numpy over a flows x links incidence matrix. Each round either
freezes every unfrozen flow whose cap is below the lowest fair share of any link, or freezes
the flows of the link with the lowest fair share at that share; the frozen rates are then
taken off every link they cross (``left -= rate[group] @ part``).

A pure-Python version that reproduced these rates bit for bit (the per-link sums of a round
taken in Python only where every addition order gives the same result, numpy's own product
otherwise) was measured no faster (about 100 us a call either way for 13-80 flows on 20-80
links in layer-wise runs), so numpy stays. Floating-point addition is not associative: a
rewrite must keep ``rate[group] @ part`` or prove its sums independent of order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from netkv.core.topology import FloatArray, IntArray

INF = float("inf")
Free = Callable[[IntArray], FloatArray]


class FlowLike(Protocol):
    links: tuple[int, ...]
    cap: float
    rate: float


def _links(col: dict[int, int]) -> IntArray:
    out: IntArray = np.fromiter(col, dtype=np.int64, count=len(col))
    return out


def fill_vectorised(flows: Sequence[FlowLike], free: Free) -> None:
    """Water-filling (numpy); sets every flow's ``rate``; ``free`` gives
    what the given physical links have left for the flows."""
    col: dict[int, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    for i, f in enumerate(flows):
        for link in f.links:
            rows.append(i)
            cols.append(col.setdefault(link, len(col)))
    incidence = np.zeros((len(flows), len(col)))
    incidence[rows, cols] = 1.0
    left = free(_links(col))
    count = incidence.sum(axis=0)
    caps = np.array([f.cap for f in flows])
    rate = np.zeros(len(flows))
    active = np.ones(len(flows), dtype=np.bool_)
    while active.any():
        share = np.full(left.shape, INF)
        np.divide(left, count, out=share, where=count > 0.5)
        level = float(share.min())
        group = active & (caps < level)
        if group.any():
            rate[group] = caps[group]
        else:
            group = active & (incidence[:, int(share.argmin())] > 0)
            rate[group] = max(level, 0.0)
        active &= ~group
        part = incidence[group]
        left -= rate[group] @ part
        count -= part.sum(axis=0)
    for f, r in zip(flows, rate.tolist(), strict=True):
        f.rate = r
