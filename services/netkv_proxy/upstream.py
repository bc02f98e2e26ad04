"""What both legs share: the one client session to the workers, the parsed upstream URLs, the
count of upstream requests open (leak checks), one request's :class:`Job`, and the error a
leg raises with the answer the client gets (:class:`UpstreamError`, in OpenAI's shape)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from aiohttp import web
from yarl import URL

from netkv_proxy.config import ProxySettings
from netkv_proxy.workers import Worker

Kind = Literal["completion", "chat"]
PATHS: dict[Kind, str] = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}
RETRY_STATUS = frozenset({502, 503, 504})


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
    headers: dict[str, str]
    arrived: float
    endpoint: str
    outcome: str = "ok"


class Upstream:
    """``async with Upstream(settings)``: the session every leg uses, and what is open."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.open = 0  # upstream requests in flight (leak checks)
        self._session: aiohttp.ClientSession | None = None
        # The hot path's constants, built once: parsed upstream URLs and the decode leg's
        # timeout.
        self._urls: dict[tuple[str, Kind], URL] = {}
        self.decode_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s,
            sock_read=settings.decode_read_timeout_s)

    async def __aenter__(self) -> Upstream:
        s = self.settings
        # One session for every leg: keep-alive connections to the workers are reused, no
        # cookie jar (the workers set none; the jar is consulted on every request otherwise).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=s.max_connections, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use Proxy as an async context manager"
        return self._session

    def url(self, worker: Worker, kind: Kind) -> URL:
        url = self._urls.get((worker.base, kind))
        if url is None:
            url = self._urls[(worker.base, kind)] = URL(worker.base + PATHS[kind])
        return url
