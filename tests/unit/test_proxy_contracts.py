"""Pure pieces of the P/D proxy and the engines: typed bodies, prompt hashing, KV leases and
worker flags."""

from __future__ import annotations

import pytest
from netkv_proxy.config import ProxySettings, WorkerEntry, parse_worker

from netkv.contracts.kvtransfer import KVTransferParams, prefill_request_params
from netkv.contracts.openai import (
    BodyError,
    ChatCompletionRequest,
    CompletionRequest,
    decode_body,
)
from netkv.engine.kvchannel import Lease
from netkv.errors import InputError
from netkv.prompts import ApproxTokenizer, block_hashes, render_chat, tokens_for_blocks

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("body", "field", "reason"), [
    (b"{", "body", "not_json"),
    (b'{"prompt": "x", "max_tokens": "8"}', "max_tokens", "wrong_type"),
    (b'{"prompt": "x", "max_tokens": 0}', "max_tokens", "out_of_range"),
    (b'{"max_tokens": 3}', "prompt", "missing_field"),
    (b'{"prompt": "x", "kv_transfer_params": {"remote_port": 70000}}',
     "kv_transfer_params.remote_port", "out_of_range"),
    (b'{"prompt": "x", "bootstrap_room": -1}', "bootstrap_room", "out_of_range"),
])
def test_bad_completion_bodies_name_the_field(body: bytes, field: str, reason: str) -> None:
    with pytest.raises(BodyError) as info:
        decode_body(body, CompletionRequest)
    assert (info.value.field, info.value.reason) == (field, reason)


def test_chat_errors_name_the_nested_field() -> None:
    with pytest.raises(BodyError) as info:
        decode_body(b'{"messages": [{"role": "user"}, {"content": "x"}]}',
                    ChatCompletionRequest)
    assert info.value.field == "messages[1].role"
    with pytest.raises(BodyError, match="messages"):
        decode_body(b'{"messages": []}', ChatCompletionRequest)


def test_prompt_shapes() -> None:
    ids = decode_body(b'{"prompt": [1, 2, 3]}', CompletionRequest).prompt_value()
    assert ids == [1, 2, 3]
    assert decode_body(b'{"prompt": [[4, 5]]}', CompletionRequest).prompt_value() == [4, 5]
    assert decode_body(b'{"prompt": ["hi"]}', CompletionRequest).prompt_value() == "hi"
    with pytest.raises(BodyError, match="one prompt"):
        decode_body(b'{"prompt": ["a", "b"]}', CompletionRequest).prompt_value()


def test_kv_transfer_params_accept_both_block_id_shapes() -> None:
    flat = decode_body(b'{"prompt": "x", "kv_transfer_params": {"remote_block_ids": [3, 4]}}',
                       CompletionRequest).kv_transfer_params
    grouped = decode_body(b'{"prompt": "x", "kv_transfer_params": '
                          b'{"remote_block_ids": [[5, 6], [7]]}}',
                          CompletionRequest).kv_transfer_params
    assert flat is not None and flat.flat_block_ids() == [3, 4]
    assert grouped is not None and grouped.flat_block_ids() == [5, 6]
    assert set(prefill_request_params()) == {"do_remote_decode", "do_remote_prefill",
                                             "remote_engine_id", "remote_block_ids",
                                             "remote_host", "remote_port"}
    assert not KVTransferParams(do_remote_prefill=True).pull_ready()


def test_block_hashes_are_prefix_chained_full_blocks() -> None:
    a = block_hashes(list(range(50)), 16)
    b = block_hashes([*range(32), 99, *range(33, 50)], 16)
    assert len(a) == 3  # the partial last block is not hashed
    assert a[:2] == b[:2] and a[2] != b[2]
    assert block_hashes([7, 1, *range(2, 50)], 16)[1] != a[1]  # a block stands for its prefix


def test_approximate_tokens_keep_shared_prefixes() -> None:
    tok = ApproxTokenizer()
    x, y = tok.encode("shared system prompt. question one"), tok.encode(
        "shared system prompt. question two")
    assert len(x) == len("shared system prompt. question one") // 4 + 1
    assert x[:7] == y[:7] and x[7:] != y[7:]  # 28 shared characters, 7 tokens
    assert render_chat([("user", "hi")]).endswith("<|assistant|>\n")


def test_trace_blocks_become_shared_token_prefixes() -> None:
    one = tokens_for_blocks([1, 2, 3], 1100, 512)
    two = tokens_for_blocks([1, 2, 9], 1200, 512)
    assert len(one) == 1100 and one[:1024] == two[:1024] and one[1024:] != two[1024:1100]


def test_lease_counts_the_tokens_of_the_blocks_read() -> None:
    lease = Lease("r", tokens=40, block_tokens=16, first_block=10, n_blocks=3, expires_s=0.0)
    assert lease.block_ids == [10, 11, 12]
    assert lease.tokens_of(None) == 40
    assert lease.tokens_of([11, 12]) == 16 + 8
    assert lease.tokens_of([12, 12, 99]) == 8


def test_worker_flags_and_settings_are_checked_once() -> None:
    assert parse_worker("http://10.0.0.1:8100=gpu-a1,bootstrap_port=8998", "--prefill") == {
        "url": "http://10.0.0.1:8100", "host": "gpu-a1", "bootstrap_port": 8998}
    with pytest.raises(InputError, match="unknown worker option"):
        parse_worker("http://h:1,colour=red", "--prefill")
    with pytest.raises(ValueError, match="http"):
        WorkerEntry(url="h:1")
    w = (WorkerEntry(url="http://h:1/v1"),)
    assert w[0].base == "http://h:1"
    with pytest.raises(InputError, match="decode"):
        ProxySettings(prefill=w)
    with pytest.raises(InputError, match="bootstrap_port"):
        ProxySettings(prefill=w, decode=(WorkerEntry(url="http://d:1"),), mode="bootstrap")
    with pytest.raises(InputError, match="twice"):
        ProxySettings(prefill=w, decode=w)
