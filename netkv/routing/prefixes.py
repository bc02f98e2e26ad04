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

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from netkv.core.topology import IntArray
from netkv.routing import native

# runs() and add() in C (the same steps; None: not built, the Python code below)
_native = native.load("_prefixes", abi=2)


class PrefixIndex:
    """Block hash -> bit mask of decoder indices, least recently used blocks evicted first.

    A plain dict (insertion-ordered; a touched block is re-inserted at the end) costs about
    half the memory of an OrderedDict per block: ~100 bytes with its two ints. It may hold
    up to 1/16th more than ``max_blocks`` between two eviction batches.
    """

    def __init__(self, max_blocks: int = 200_000) -> None:
        self._c = _native
        self.max_blocks = max_blocks
        self._slack = max_blocks // 16
        self._holders: dict[int, int] = {}
        self._bits_of: dict[int, IntArray] = {}
        self._flags_of: dict[int, np.ndarray[Any, np.dtype[np.bool_]]] = {}
        self._bits_n = -1
        self._pow2: np.ndarray[Any, np.dtype[np.uint64]] = np.zeros(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._holders)

    def overlap(self, hashes: Sequence[int], n_decoders: int) -> IntArray | None:
        """Leading blocks of ``hashes`` each decoder holds (None when nobody holds the first)."""
        runs = self.runs(hashes)
        return None if runs is None else self.from_runs(runs, n_decoders)

    def runs(self, hashes: Sequence[int]) -> list[list[int]] | None:
        """``[holders, blocks]`` per run of the prompt's leading blocks held by the same
        decoders (bit masks, each a subset of the one before), or None when nobody holds
        the first block. Decoder ``d`` holds the sum of the runs whose holders include it."""
        if self._c is not None:
            got: list[list[int]] | None = self._c.runs(self._holders, hashes)
            return got
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
        return runs

    def from_runs(self, runs: list[list[int]], n_decoders: int) -> IntArray:
        """The per-decoder overlap of :meth:`runs`: the sum of (run length x its holders'
        bits), each holder set unpacked once (the same few recur: a shared system prompt's,
        a conversation's); a run with few holders adds per bit. Exact int64."""
        mask, count = runs[0]
        out: IntArray = self.bits(mask, n_decoders) * count
        low = (1 << n_decoders) - 1
        for holders_of_run, count in runs[1:]:
            rest = holders_of_run & low
            if rest.bit_count() > 8:
                out += self.bits(rest, n_decoders) * count
                continue
            while rest:  # a few holders (a conversation's decoders): one add per bit
                bit = rest & -rest
                out[bit.bit_length() - 1] += count
                rest ^= bit
        return out

    def flags(self, mask: int, n_decoders: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """``bits(mask, n_decoders) != 0`` (read-only): for up to 64 decoders one AND against
        the powers of two (a holder set seen once, e.g. a conversation's that grows turn by
        turn, costs no unpacking), kept per set (a conversation's sets recur between its
        turns: about two in five lookups hit in the scheduler bench)."""
        out: np.ndarray[Any, np.dtype[np.bool_]]
        if n_decoders > 64:
            out = self.bits(mask, n_decoders) != 0
            return out
        if self._pow2.shape[0] != n_decoders:
            self._pow2 = np.left_shift(np.uint64(1), np.arange(n_decoders, dtype=np.uint64))
            self._flags_of.clear()
        mask &= (1 << n_decoders) - 1
        hit = self._flags_of.get(mask)
        if hit is None:
            if len(self._flags_of) >= 4096:
                self._flags_of.clear()
            hit = np.bitwise_and(self._pow2, np.uint64(mask)) != 0
            hit.flags.writeable = False
            self._flags_of[mask] = hit
        return hit

    def bits(self, mask: int, n_decoders: int) -> IntArray:
        """Bit ``d`` of ``mask`` at position ``d`` (int64, read-only), unpacked once per
        holder set: the same few sets (a shared system prompt's, a conversation's) recur."""
        if n_decoders != self._bits_n:
            self._bits_of.clear()
            self._bits_n = n_decoders
        hit = self._bits_of.get(mask)
        if hit is None:
            if len(self._bits_of) >= max(16, min(4096, (1 << 20) // max(n_decoders, 1))):
                self._bits_of.clear()
            width = (n_decoders + 7) // 8
            raw = (mask & ((1 << n_decoders) - 1)).to_bytes(width, "little")
            unpacked = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
            hit = unpacked[:n_decoders].astype(np.int64)
            hit.flags.writeable = False
            self._bits_of[mask] = hit
        return hit

    def clear(self) -> None:
        """Forget every holding (after the decoder set was compacted: bits would shift). The
        index is a cache of our own placements: an empty one costs full-transfer estimates
        until it refills, nothing else."""
        self._holders.clear()
        self._bits_of.clear()
        self._flags_of.clear()

    def add(self, hashes: Sequence[int], decoder: int) -> None:
        """``decoder`` holds ``hashes`` now (each becomes the most recently used)."""
        if self._c is not None:
            self._c.add(self._holders, hashes, 1 << decoder, self.max_blocks + self._slack,
                        self.max_blocks)
            return
        holders = self._holders
        bit = 1 << decoder
        pop = holders.pop
        for h in hashes:
            holders[h] = pop(h, 0) | bit  # re-inserted last: the most recently used
        if len(holders) > self.max_blocks + self._slack:
            # Evict in batches (the oldest 1/16th at once): deleting from the front of a
            # dict one key per call would rescan the deleted slots every time.
            for h in list(itertools.islice(holders, len(holders) - self.max_blocks)):
                del holders[h]
