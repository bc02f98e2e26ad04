"""The bodies the proxy's legs send: the client's JSON values passed on as they came (kept as
raw JSON text, not rebuilt), with only the pull flow's own fields changed."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from netkv_proxy.config import ProxySettings, WorkerEntry
from netkv_proxy.front import Front
from netkv_proxy.legs import Legs
from netkv_proxy.metrics import ProxyMetrics

from netkv.contracts.openai import BodyError
from netkv.prompts import ApproxTokenizer

pytestmark = pytest.mark.unit


class _Request:
    headers: dict[str, str] = {"Authorization": "Bearer k"}  # noqa: RUF012


def front() -> Front:
    settings = ProxySettings(port=0, prefill=(WorkerEntry(url="http://127.0.0.1:1"),),
                             decode=(WorkerEntry(url="http://127.0.0.1:2"),))

    async def dispatch(*_: Any) -> Any:
        raise AssertionError("not dispatched")

    return Front(settings, ApproxTokenizer(), ProxyMetrics(), dispatch)


def test_values_pass_through_and_the_prefill_body_has_the_pull_fields() -> None:
    body = {"model": "m", "prompt": list(range(40)), "max_tokens": 9, "stream": True,
            "stream_options": {"include_usage": True}, "min_tokens": 2, "temperature": 0.7,
            "user": "\u00e9l\u00e8ve \u2603", "logit_bias": {"50256": -100},
            "max_completion_tokens": 9}
    job = front()._job(_Request(), msgspec.json.encode(body), "completion", "r1")  # type: ignore[arg-type]
    assert job.tokens == 40 and job.output_tokens == 9 and job.stream
    assert job.extra == b"X-Request-Id: r1\r\nAuthorization: Bearer k\r\n"
    sent = msgspec.json.decode(Legs._prefill_body(job))
    assert sent == {**{k: v for k, v in body.items()
                       if k not in ("stream_options", "min_tokens")},
                    "stream": False, "max_tokens": 1, "max_completion_tokens": 1,
                    "kv_transfer_params": sent["kv_transfer_params"]}
    assert sent["kv_transfer_params"]["do_remote_decode"] is True
    assert msgspec.json.decode(msgspec.json.encode(job.body)) == body  # the decode's body


def test_a_body_that_is_not_an_object_is_a_400_naming_the_body() -> None:
    with pytest.raises(BodyError):
        front()._job(_Request(), b"[1, 2]", "completion", "r2")  # type: ignore[arg-type]
