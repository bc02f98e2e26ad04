"""An LRU prefix cache over fixed-size token blocks, keyed by block hash.

Mooncake traces name each 512-token prefix block by a hash id; equal ids mean reusable KV.
A cache hit is the longest run of *leading* blocks present (KV of block ``i`` depends on
every block before it), as in vLLM's and SGLang's prefix caching.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BLOCK_TOKENS = 512  # tokens per prefix block: the Mooncake traces' hash ids (and this project's)


class PrefixCache:
    """LRU over block hashes with a capacity in blocks (0 disables caching)."""

    __slots__ = ("blocks", "capacity")

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        self.capacity = capacity_blocks
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are cached (does not touch recency)."""
        blocks = self.blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        """Record ``hashes`` as most recently used, evicting the least recent beyond capacity."""
        if self.capacity == 0:
            return
        blocks = self.blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def __len__(self) -> int:
        return len(self.blocks)
