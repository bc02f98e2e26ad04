"""What both legs share: a keep-alive connection pool per worker
(:class:`~netkv_proxy.engineclient.EnginePool`), the count of upstream requests open (leak
checks), one request's :class:`Job`, and the error a leg raises with the answer the client
gets (:class:`UpstreamError`, in OpenAI's shape)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from netkv.http.h1 import H1Request, H1Stream
from netkv_proxy.config import ProxySettings
from netkv_proxy.engineclient import EnginePool
from netkv_proxy.workers import Worker

Kind = Literal["completion", "chat"]
PATHS: dict[Kind, str] = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}
RETRY_STATUS = frozenset({502, 503, 504})

# A client's request and the answer to it on either front (``front = "h1"`` or "aiohttp")
Request = web.BaseRequest | H1Request
Answer = web.StreamResponse | H1Stream


class UpstreamError(Exception):
    """A leg failed; ``response`` is what the client gets."""

    def __init__(self, response: web.Response, outcome: str) -> None:
        super().__init__(outcome)
        self.response, self.outcome = response, outcome


@dataclass(slots=True)
class Job:
    """One client request on its way through the proxy."""

    kind: Kind
    request_id: str
    body: dict[str, Any]
    tokens: int
    hashes: list[int]
    output_tokens: int
    stream: bool
    extra: bytes  # the request header lines both legs send (engineclient.header_block)
    arrived: float
    endpoint: str
    outcome: str = "ok"


class Upstream:
    """``async with Upstream(settings)``: one connection pool per worker, and what is open."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.open = 0  # upstream requests in flight (leak checks)
        self._pools: dict[str, EnginePool] = {}

    async def __aenter__(self) -> Upstream:
        s = self.settings
        for entry in (*s.prefill, *s.decode):
            self._pools[entry.base] = EnginePool(
                entry.base, connect_timeout_s=s.connect_timeout_s,
                max_connections=s.max_connections)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def pool(self, worker: Worker) -> EnginePool:
        return self._pools[worker.base]

    @property
    def connections(self) -> int:
        """Connections to the workers, busy, idle or being opened."""
        return sum(p.open for p in self._pools.values())
