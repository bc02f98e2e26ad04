"""The decode engine says who it is and where it was told to take the KV from, so a router
that reports neither (vllm-router, sglang-router) still has its pairs classified."""

from __future__ import annotations

import aiohttp
import pytest

from netkv.engine.server import Engine, EngineSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_decode_answer_names_the_engine_and_the_prefill() -> None:
    async with Engine(EngineSettings(role="prefill", engine_id="pre-7")) as pre, \
            Engine(EngineSettings(role="decode", engine_id="dec-3")) as dec, \
            aiohttp.ClientSession() as http:
        body = {"model": "netkv/emulated", "prompt": "hello " * 64, "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
        async with http.post(pre.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["x-netkv-engine"] == "pre-7"
            assert "x-netkv-kv-from" not in resp.headers  # a prefill leg takes no KV
            params = (await resp.json())["kv_transfer_params"]
        for stream in (False, True):
            if stream:  # a second decode of the same KV: pull again from a fresh prefill leg
                async with http.post(pre.url + "/v1/completions", json=body) as resp:
                    params = (await resp.json())["kv_transfer_params"]
            async with http.post(dec.url + "/v1/completions", json={
                    "model": "netkv/emulated", "prompt": "hello " * 64, "max_tokens": 3,
                    "stream": stream, "kv_transfer_params": params}) as resp:
                assert resp.status == 200
                await resp.read()
                assert resp.headers["x-netkv-engine"] == "dec-3"
                assert resp.headers["x-netkv-kv-from"] == "pre-7"


async def test_kv_from_is_sent_when_the_pull_failed_and_never_unsafe() -> None:
    """A pull that cannot connect is recomputed (no x-netkv-kv-bytes), but the pair is still
    named; an engine id with a line break (from a body) is not echoed into a header."""
    async with Engine(EngineSettings(role="decode", engine_id="dec-1")) as dec, \
            aiohttp.ClientSession() as http:
        base = {"do_remote_prefill": True, "do_remote_decode": False, "remote_host":
                "127.0.0.1", "remote_port": 1, "remote_request_id": "gone",
                "remote_block_ids": [0]}
        for engine_id, expected in (("pre-9", "pre-9"), ("bad\r\nx-evil: 1", None)):
            async with http.post(dec.url + "/v1/completions", json={
                    "model": "netkv/emulated", "prompt": "hi there", "max_tokens": 1,
                    "kv_transfer_params": {**base, "remote_engine_id": engine_id}}) as resp:
                assert resp.status == 200
                assert "x-netkv-kv-bytes" not in resp.headers
                assert resp.headers.get("x-netkv-kv-from") == expected
                assert "x-evil" not in resp.headers
