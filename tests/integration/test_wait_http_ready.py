"""wait_http_ready against a real aiohttp server and a real child process on loopback."""

from __future__ import annotations

import asyncio
import sys

import pytest
from aiohttp import web

from netkv.localservers import ServerError, wait_http_ready

pytestmark = pytest.mark.integration


async def _serve(statuses: list[int]) -> tuple[web.AppRunner, str]:
    async def ready(_: web.Request) -> web.Response:
        return web.Response(status=statuses.pop(0) if len(statuses) > 1 else statuses[0],
                            text="warming up")
    app = web.Application()
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/ready"


async def test_returns_once_the_url_answers_200() -> None:
    statuses = [503, 503, 200]
    runner, url = await _serve(statuses)
    try:
        await wait_http_ready(url, None, timeout_s=10.0, every_s=0.01)
        assert statuses == [200]  # both 503s were seen first
    finally:
        await runner.cleanup()


async def test_times_out_with_what_the_last_try_saw() -> None:
    runner, url = await _serve([503])
    try:
        with pytest.raises(ServerError, match=r"not ready at .* after 0.2s: HTTP 503: warming up"):
            await wait_http_ready(url, None, timeout_s=0.2, every_s=0.01)
    finally:
        await runner.cleanup()


async def test_a_child_that_exits_first_is_reported_with_its_code() -> None:
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(3)")
    await child.wait()
    with pytest.raises(ServerError, match="exited with 3 before"):
        await wait_http_ready("http://127.0.0.1:9/ready", lambda: child.returncode,
                              timeout_s=10.0)
