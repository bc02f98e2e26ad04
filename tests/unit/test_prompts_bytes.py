"""The approximate tokenizer's ids as bytes (the proxy's text-prompt path): the same token
count and block hashes as the list of ids."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netkv.prompts import ApproxTokenizer, block_hashes, block_hashes_of_bytes

pytestmark = pytest.mark.unit


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=400), block=st.sampled_from([1, 2, 3, 16, 64]))
def test_bytes_path_gives_the_same_count_and_hashes(text: str, block: int) -> None:
    tok = ApproxTokenizer()
    ids = tok.encode(text)
    raw = tok.encode_bytes(text)
    assert len(raw) // 4 == len(ids) and len(raw) % 4 == 0
    assert block_hashes_of_bytes(raw, block) == block_hashes(ids, block)


def test_a_long_prompt_and_the_edges() -> None:
    tok = ApproxTokenizer()
    text = "Summarise the state of the network. \u00e9\u4e2d\U0001f600 " * 700  # ~36 kB
    assert block_hashes_of_bytes(tok.encode_bytes(text), 16) == \
        block_hashes(tok.encode(text), 16)
    assert tok.encode_bytes("") == b"" and block_hashes_of_bytes(b"", 16) == []
    assert block_hashes_of_bytes(tok.encode_bytes("x" * 60), 16) == []  # 15 ids: no full block
    one = block_hashes_of_bytes(tok.encode_bytes("x" * 61), 16)  # 16 ids, the last padded
    assert len(one) == 1 and one == block_hashes(tok.encode("x" * 61), 16)
