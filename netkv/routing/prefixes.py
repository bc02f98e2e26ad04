"""Which decoders hold which prefix blocks, as far as the scheduler's own decisions tell.

A decoder that already holds the first blocks of a prompt needs only the rest transferred
(delta transfer). The scheduler learns holdings from what it placed: after a request with
``block_hashes`` goes to decoder ``d``, ``d`` holds those blocks. The index is an LRU bounded
in blocks, so memory stays fixed however long the service runs; an evicted block merely
costs a full transfer estimate. Block hashes are prefix-chained (vLLM's and the Mooncake
trace's: a block's id stands for the whole prefix up to it), so positions need no tracking.
Holders are bit masks (Python ints), so following a prefix
is one AND per block whatever the number of decoders.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from netkv.core.topology import IntArray


class PrefixIndex:
    """Block hash -> bit mask of decoder indices, least recently used blocks evicted first."""

    def __init__(self, max_blocks: int = 200_000) -> None:
        self.max_blocks = max_blocks
        self._holders: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def overlap(self, hashes: Sequence[int], n_decoders: int) -> IntArray | None:
        """Leading blocks of ``hashes`` each decoder holds (None when nobody holds the first)."""
        holders = self._holders
        alive = holders.get(hashes[0], 0) if hashes else 0
        if not alive:
            return None
        # Holder sets shrink block by block; add each distinct set once, times its run.
        runs: list[list[int]] = [[alive, 1]]
        for h in hashes[1:]:
            alive &= holders.get(h, 0)
            if not alive:
                break
            if alive == runs[-1][0]:
                runs[-1][1] += 1
            else:
                runs.append([alive, 1])
        out = np.zeros(n_decoders, dtype=np.int64)
        width = (n_decoders + 7) // 8
        for mask, count in runs:
            raw = (mask & ((1 << n_decoders) - 1)).to_bytes(width, "little")
            bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
            out += count * bits[:n_decoders].astype(np.int64)
        return out

    def add(self, hashes: Sequence[int], decoder: int) -> None:
        holders = self._holders
        bit = 1 << decoder
        for h in hashes:
            mask = holders.get(h)
            if mask is None:
                holders[h] = bit
            else:
                holders[h] = mask | bit
                holders.move_to_end(h)
        while len(holders) > self.max_blocks:
            holders.popitem(last=False)
