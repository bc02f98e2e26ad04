"""The engines' view of the scheduler service: ``POST /v1/select`` and ``POST /v1/release``.

A router in front of a real prefill/decode deployment makes the same two calls. Timeouts are
bounded; an error answer is raised with the service's message so the request is recorded as
failed rather than silently sent somewhere.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from netkv.testbed.engines import Decision, Request


class SelectionError(RuntimeError):
    """The scheduler refused or failed a decision."""


class HttpSelector:
    """Async context manager holding one HTTP session to the scheduler."""

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None
        self.decisions: list[dict[str, Any]] = []

    async def __aenter__(self) -> HttpSelector:
        self._http = aiohttp.ClientSession(timeout=self.timeout, headers=self.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._http is not None, "use HttpSelector as an async context manager"
        async with self._http.post(self.base_url + path, json=body) as resp:
            try:
                data = await resp.json()
            except (aiohttp.ContentTypeError, ValueError):
                data = {"error": (await resp.text())[:200]}
            if resp.status != 200 or not isinstance(data, dict):
                raise SelectionError(f"{path}: HTTP {resp.status}: {data}")
            return data

    async def select(self, request: Request, prefill: str, policy: str) -> Decision:
        data = await self._post("/v1/select", {
            "request_id": request.request_id, "prefill": prefill,
            "prompt_tokens": request.prompt_tokens, "output_tokens": request.output_tokens,
            "block_hashes": list(request.block_hashes), "policy": policy})
        self.decisions.append(data)
        ttft_ms = data.get("predicted_ttft_ms")
        return Decision(str(data["decode"]),
                        None if ttft_ms is None else float(ttft_ms) / 1e3, data)

    async def release(self, request_id: str, decode: str) -> None:
        await self._post("/v1/release", {"request_id": request_id})

    async def report_load(self, decode: str, running: int, waiting: int,
                          kv_use: float) -> None:
        """What a vLLM engine's metrics would say, pushed to ``POST /v1/instances``."""
        await self._post("/v1/instances", {"name": decode, "running": running,
                                           "waiting": waiting, "kv_use": kv_use})
