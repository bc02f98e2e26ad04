"""Token-id prompts are recognised by their element types (one pass, no copy)."""

from __future__ import annotations

import msgspec
import pytest

from netkv.contracts.openai import BodyError, CompletionRequest, decode_body


def test_long_token_id_prompt_is_returned_as_is() -> None:
    ids = list(range(20_000))
    body = msgspec.json.encode({"model": "m", "prompt": ids})
    assert decode_body(body, CompletionRequest).prompt_value() == ids


@pytest.mark.parametrize("prompt", [[1, "a"], [1, [2]], ["a", 1], [[1], [2]]])
def test_mixed_prompts_are_refused(prompt: list[object]) -> None:
    body = msgspec.json.encode({"model": "m", "prompt": prompt})
    with pytest.raises(BodyError) as err:
        decode_body(body, CompletionRequest).prompt_value()
    assert err.value.field == "prompt"


def test_booleans_are_not_token_ids() -> None:
    with pytest.raises(BodyError):
        decode_body(b'{"model": "m", "prompt": [true, 1]}', CompletionRequest).prompt_value()
