"""Which decoders hold which prefix blocks, as far as the scheduler's own decisions tell.

A decoder that already holds the first blocks of a prompt needs only the rest transferred
(delta transfer). The scheduler learns holdings from what it placed: after a request with
``block_hashes`` goes to decoder ``d``, ``d`` holds those blocks. The index is an LRU bounded
in blocks, so memory stays fixed however long the service runs; an evicted block merely
costs a full transfer estimate.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from netkv.core.topology import IntArray


class PrefixIndex:
    """Block hash -> set of decoder indices, least recently used blocks evicted first."""

    def __init__(self, max_blocks: int = 200_000) -> None:
        self.max_blocks = max_blocks
        self._holders: OrderedDict[int, set[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def overlap(self, hashes: Sequence[int], n_decoders: int) -> IntArray | None:
        """Leading blocks of ``hashes`` each decoder holds (None when nobody holds the first)."""
        if not hashes:
            return None
        alive = self._holders.get(hashes[0])
        if not alive:
            return None
        out = np.zeros(n_decoders, dtype=np.int64)
        for depth, h in enumerate(hashes, start=1):
            holders = self._holders.get(h)
            if holders is None:
                break
            alive = alive & holders
            if not alive:
                break
            out[list(alive)] = depth
        return out

    def add(self, hashes: Sequence[int], decoder: int) -> None:
        holders = self._holders
        for h in hashes:
            entry = holders.get(h)
            if entry is None:
                holders[h] = {decoder}
            else:
                entry.add(decoder)
                holders.move_to_end(h)
        while len(holders) > self.max_blocks:
            holders.popitem(last=False)
