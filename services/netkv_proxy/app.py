"""The proxy: its parts, their lifecycle, and the HTTP app that wires the routes.

Where each concept lives:

* :mod:`netkv_proxy.front`: the OpenAI-compatible completion routes (validation at the edge,
  request ids, the request counter);
* :mod:`netkv_proxy.legs`: the two-leg flows (vLLM pull/push, SGLang bootstrap), the prefill
  leg with its retries;
* :mod:`netkv_proxy.relay`: the decode leg and the SSE relay;
* :mod:`netkv_proxy.placement` and :mod:`netkv_proxy.prefill`: where a request goes;
* :mod:`netkv_proxy.workers`: worker health, ejection, re-admission and load;
* :mod:`netkv_proxy.stalls`: the proxy's own stalls (event-loop lag, GC pauses);
* :mod:`netkv_proxy.upstream`: what both legs share (a connection pool per worker, on
  :mod:`netkv_proxy.engineclient`).

Answers say where they went: ``x-netkv-prefill``, ``x-netkv-decode``, ``x-netkv-tier``,
``x-netkv-predicted-ms``, and ``x-netkv-map`` (``map v<version>`` or ``prior: <why>`` when
the tier priors were used). This module serves the small endpoints too: ``GET /v1/models``,
``GET /health``, ``GET /metrics`` and ``GET /netkv/state`` (what is open, for leak checks).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client import generate_latest

from netkv.contracts.openai import ModelCard, ModelList
from netkv.core.topology import Topology
from netkv.http.h1 import H1Guard, Handler
from netkv.http.server import ConnectionGuard
from netkv.prompts import TokenCounter, tokenizer_from
from netkv.routing.mapfeed import MapFeed
from netkv.supervisor import Supervisor
from netkv_proxy.config import ProxySettings
from netkv_proxy.front import Front, json_errors
from netkv_proxy.legs import Legs
from netkv_proxy.metrics import ProxyMetrics
from netkv_proxy.placement import Placement
from netkv_proxy.prefill import PrefillChooser
from netkv_proxy.stalls import StallMonitor
from netkv_proxy.upstream import Request, Upstream
from netkv_proxy.workers import WorkerPool


class Proxy:
    """``async with Proxy(settings, topology, feed)``; :meth:`app` is the aiohttp app."""

    def __init__(self, settings: ProxySettings, topology: Topology,
                 feed: MapFeed | None = None) -> None:
        self.settings = settings
        self.topology = topology
        self.feed = feed
        self.pool = WorkerPool(settings.prefill, settings.decode, topology,
                               eject_after=settings.eject_after,
                               readmit_after=settings.readmit_after)
        self.placement = Placement(
            topology, self.pool, feed=feed, policy=settings.policy,
            policy_params=settings.policy_params, bytes_per_token=settings.bytes_per_token,
            capacity_tokens=settings.capacity_tokens, block_tokens=settings.block_size,
            prefix_blocks=settings.prefix_blocks)
        self.prefills = PrefillChooser(self.pool, block_tokens=settings.block_size,
                                       prefix_blocks=settings.prefix_blocks)
        self.metrics = ProxyMetrics()
        self.stalls = StallMonitor(self.metrics)
        self.tokenizer: TokenCounter = tokenizer_from(settings.tokenizer)
        self.supervisor = Supervisor("proxy")
        self.upstream = Upstream(settings)
        self.legs = Legs(settings, self.upstream, self.pool, placement=self.placement,
                         prefills=self.prefills, metrics=self.metrics)
        self.front = Front(settings, self.tokenizer, self.metrics, self.legs.run)
        self._health_session: aiohttp.ClientSession | None = None
        # set by the server (client connections; the h1 front's guard has the same counters)
        self.guard: ConnectionGuard | H1Guard | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> Proxy:
        s = self.settings
        await self.upstream.__aenter__()
        self._health_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64))
        await self.supervisor.__aenter__()
        try:
            await self.pool.check_all(self._health_session, s.health_timeout_s)
            self.supervisor.spawn(self.pool.run(self._health_session, s.health_interval_s,
                                                s.health_timeout_s), name="health")
            self.stalls.__enter__()
            self.supervisor.spawn(self.stalls.run(), name="loop-lag")
            if self.feed is not None:
                self.feed.spawn(self.supervisor)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stalls.__exit__()
        await self.supervisor.stop()
        await self.upstream.__aexit__(None, None, None)
        if self._health_session is not None:
            await self._health_session.close()
        self._health_session = None

    @property
    def upstream_open(self) -> int:
        """Upstream requests in flight (leak checks)."""
        return self.upstream.open

    def routes(self) -> dict[tuple[str, str], Handler]:
        """The routes, for either front: ``(method, path) -> handler``."""
        return {("POST", "/v1/completions"): self.front.completions,
                ("POST", "/v1/chat/completions"): self.front.chat,
                ("GET", "/v1/models"): self.models,
                ("GET", "/health"): self.health,
                ("GET", "/metrics"): self.metrics_page,
                ("GET", "/netkv/state"): self.state}

    def app(self) -> web.Application:
        """The routes as an aiohttp app (``front = "aiohttp"``)."""
        app = web.Application(client_max_size=self.settings.max_body_bytes,
                              middlewares=[json_errors])
        for (method, path), handler in self.routes().items():
            # the handlers take either front's request (upstream.Request)
            app.router.add_route(method, path, cast(Any, handler))
        return app

    # -- small endpoints --------------------------------------------------------------------
    async def models(self, request: Request) -> web.Response:
        cards = [ModelCard(id=m) for m in self.pool.models()]
        return web.Response(body=msgspec.json.encode(ModelList(data=cards)),
                            content_type="application/json")

    async def health(self, request: Request) -> web.Response:
        p = [w for w in self.pool.prefills if w.healthy]
        d = [w for w in self.pool.decodes if w.healthy]
        ok = bool(p and d) and self.supervisor.healthy
        body = {"status": "ok" if ok else "unavailable", "prefill_healthy": len(p),
                "decode_healthy": len(d), "map": self.placement.map_state().source,
                "failures": [f.name for f in self.supervisor.failures]}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics_page(self, request: Request) -> web.Response:
        m = self.metrics
        for w in self.pool.all:
            m.worker_healthy.labels(w.name, w.role).set(1 if w.healthy else 0)
            m.worker_ejections.labels(w.name, w.role).set(w.ejections)
            m.worker_inflight.labels(w.name, w.role).set(w.inflight)
        m.bookings.set(self.placement.bookings.active)
        state = self.placement.map_state()
        m.map_stale.set(1 if state.source == "prior" else 0)
        m.map_age.set(state.age_s if state.age_s is not None else float("nan"))
        return web.Response(body=generate_latest(m.registry), content_type="text/plain",
                            charset="utf-8")

    async def state(self, request: Request) -> web.Response:
        """What is open right now (leak checks): bookings, placements, upstream requests."""
        return web.json_response({
            "bookings": self.placement.bookings.active,
            "placements": len(self.placement.open),
            "upstream_open": self.upstream_open,
            "upstream_connections": self.upstream.connections,
            "tasks": len(asyncio.all_tasks()),
            "workers": [{"name": w.name, "role": w.role, "healthy": w.healthy,
                         "inflight": w.inflight, "ejections": w.ejections,
                         "running": w.running, "waiting": w.waiting, "kv_use": w.kv_use,
                         "last_error": w.last_error} for w in self.pool.all]})
