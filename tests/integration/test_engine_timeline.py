"""The engines' per-request phase timestamps (the router comparison's measured breakdown):
recorded in order for both legs, under the id both engines saw, bounded, off by default."""

from __future__ import annotations

import aiohttp
import pytest

from netkv.engine.server import Engine, EngineSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PREFILL = ("received", "parsed", "compute_start", "compute_end", "answered")
DECODE = ("received", "parsed", "kv_start", "kv_end", "slot", "first_write", "done")


async def two_legs(pre: Engine, dec: Engine, rid: str) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": "netkv/emulated", "prompt": list(range(300)), "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
        headers = {"X-Request-Id": rid}
        async with http.post(pre.url + "/v1/completions", json=body, headers=headers) as r:
            params = (await r.json())["kv_transfer_params"]
        async with http.post(dec.url + "/v1/completions", headers=headers, json={
                "model": "netkv/emulated", "prompt": list(range(300)), "max_tokens": 4,
                "stream": True, "kv_transfer_params": params}) as r:
            assert r.status == 200
            await r.read()


async def test_both_legs_are_timed_in_order() -> None:
    async with Engine(EngineSettings(role="prefill", timeline=10)) as pre, \
            Engine(EngineSettings(role="decode", timeline=10)) as dec:
        await two_legs(pre, dec, "req-1")
        p, d = pre.timeline["req-1"], dec.timeline["req-1"]
        assert list(p) == list(PREFILL)
        assert [p[k] for k in PREFILL] == sorted(p[k] for k in PREFILL)
        assert p["compute_end"] - p["compute_start"] >= pre.model.prefill_overhead_s * 0.9
        assert list(d) == list(DECODE)
        assert [d[k] for k in DECODE] == sorted(d[k] for k in DECODE)
        assert d["received"] >= p["answered"]  # one clock for every engine of a process


async def test_timeline_is_bounded_and_off_by_default() -> None:
    async with Engine(EngineSettings(role="prefill", timeline=1)) as pre, \
            Engine(EngineSettings(role="decode")) as dec:
        await two_legs(pre, dec, "a")
        await two_legs(pre, dec, "b")
        assert list(pre.timeline) == ["a"]
        assert dec.timeline == {}
