"""The shared HTTP edge (netkv.http) on the real scheduler app: JSON-only bodies, JSON errors
for every status, auth before anything else (issue 9 items 1 and the 404/405 finding)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from helpers import scheduler_process

pytestmark = [pytest.mark.integration, pytest.mark.security]


@pytest.fixture
async def base() -> AsyncIterator[str]:
    """A real ``netkv scheduler`` process (the same test runs against an older commit)."""
    async with scheduler_process({"NETKV_MAX_BODY_BYTES": "4096",
                                  "NETKV_LOG_LEVEL": "warning"}) as (url, _):
        yield url


SELECT = b'{"request_id": "r", "prefill": "h000-p0", "prompt_tokens": 10}'


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
async def test_a_non_json_body_is_415_and_changes_nothing(base: str,
                                                          content_type: str | None) -> None:
    """A web page can post text/plain cross-origin without a preflight: it must not steer."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as http:
        async with http.post(f"{base}/v1/select", data=SELECT, headers=headers) as resp:
            assert resp.status == 415 and resp.content_type == "application/json"
            assert (await resp.json())["field"] == "content-type"
        async with http.get(f"{base}/v1/instances") as resp:
            assert (await resp.json())["open_reservations"] == 0
        async with http.post(f"{base}/v1/select", data=SELECT,
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 200


async def test_404_and_405_are_json(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/nowhere") as resp:
            assert resp.status == 404 and resp.content_type == "application/json"
            assert (await resp.json())["field"] == "path"
        async with http.put(f"{base}/v1/select", json={}) as resp:
            assert resp.status == 405 and resp.content_type == "application/json"
            assert (await resp.json())["field"] == "method" and "Allow" in resp.headers


async def test_a_declared_oversized_body_is_413_before_reading(base: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            f"{base}/v1/release", data=b"x" * 8192,
            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413 and (await resp.json())["field"] == "body"


async def test_the_oracle_api_uses_the_same_edge() -> None:
    from netkv_oracle.api import ApiState, build_app
    from netkv_oracle.metrics import OracleMetrics
    app = build_app(ApiState(lambda: None, lambda: (True, ""), lambda: (False, "no map"),
                             OracleMetrics()))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://{host}:{port}/v1/costs", data=b"{}",
                                 headers={"Content-Type": "text/plain"}) as resp:
                assert resp.status == 415 and (await resp.json())["field"] == "content-type"
            async with http.delete(f"http://{host}:{port}/v1/map") as resp:
                assert resp.status == 405 and resp.content_type == "application/json"
    finally:
        await runner.cleanup()
