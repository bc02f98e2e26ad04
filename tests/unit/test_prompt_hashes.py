"""netkv.prompts.block_hashes gives the hashes its specification says (the per-block loop it
replaced, kept here as the reference), for lists, tuples and arrays of ids."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pytest

from netkv.prompts import block_hashes

pytestmark = pytest.mark.unit


def reference(tokens: Sequence[int], block_tokens: int) -> list[int]:
    n = len(tokens) // block_tokens
    out: list[int] = []
    parent = b"\0" * 8
    for i in range(n):
        block = np.asarray(tokens[i * block_tokens:(i + 1) * block_tokens], dtype="<u4")
        h = hashlib.blake2b(parent, digest_size=8)
        h.update(block.tobytes())
        parent = h.digest()
        out.append(int.from_bytes(parent, "little") & 0x7FFFFFFFFFFFFFFF)
    return out


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 100, 4096, 8191])
@pytest.mark.parametrize("block", [1, 7, 16])
def test_the_same_hashes_as_the_reference(n: int, block: int) -> None:
    rng = np.random.default_rng(n * 31 + block)
    ids = [int(x) for x in rng.integers(0, 2**32, n, dtype=np.uint64)]
    want = reference(ids, block)
    assert block_hashes(ids, block) == want
    assert block_hashes(tuple(ids), block) == want
    assert block_hashes(np.array(ids, dtype=np.int64), block) == want  # type: ignore[arg-type]
    assert all(0 <= h < 2**63 for h in want)


def test_ids_outside_uint32_are_refused() -> None:
    with pytest.raises(OverflowError):
        block_hashes([-1] * 16, 16)
    with pytest.raises(OverflowError):
        block_hashes([2**32] * 16, 16)
