"""The oracle's live congestion view: one page, its assets shipped in the package (no CDN).

Routes (registered by :func:`add_routes`, next to the oracle's JSON API):

* ``GET /view``: the page (``static/view.html``); ``?scheduler=URL`` names a scheduler whose
  ``GET /v1/decisions/recent`` the page shows beside the map;
* ``GET /view/static/{name}``: its script and style sheet;
* ``GET /view/state?tokens=N``: the map as the page draws it: version, age, per link its
  measured utilisation (share of capacity), available bandwidth and confidence, and per host
  pair the predicted transfer time of an ``N``-token prompt's KV (LLaMA3-70B, 320 KiB a token);
* ``GET /view/events?tokens=N``: the same state as Server-Sent Events, one event per new map
  version (checked every :data:`POLL_S`) and at least one every :data:`HEARTBEAT_S`, so the
  page can say how old the map is and when the stream itself is gone.

Everything here only reads the map the oracle serves; nothing is written.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np
from aiohttp import web

from netkv.core.congestion import CongestionMap
from netkv.errors import InputError

MapGetter = Callable[[], CongestionMap | None]
CURRENT: web.AppKey[MapGetter] = web.AppKey("view_current_map", object)  # type: ignore[arg-type]
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("view_closing", asyncio.Event)

KV_BYTES_PER_TOKEN = 327_680  # LLaMA3-70B: 80 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes
DEFAULT_TOKENS = 12_000  # about the conversation trace's mean prompt
MAX_TOKENS = 1_000_000
POLL_S = 0.25
HEARTBEAT_S = 1.0
STALE_S = 5.0  # the page calls the map stale when it is older than this
HOT_SHARE = 0.8  # ... and a link hot when this share of its capacity is in use
_ASSETS = {"view.js": "text/javascript", "view.css": "text/css"}


def _asset(name: str) -> bytes:
    return (resources.files("netkv_oracle") / "static" / name).read_bytes()


def _tokens(request: web.Request) -> int:
    raw = request.query.get("tokens", str(DEFAULT_TOKENS))
    try:
        tokens = int(raw)
    except ValueError:
        raise InputError("tokens", f"expected an integer, got {raw[:40]!r}") from None
    if not 1 <= tokens <= MAX_TOKENS:
        raise InputError("tokens", f"must be in 1..{MAX_TOKENS}, got {tokens}")
    return tokens


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


def topology_json(cmap: CongestionMap) -> dict[str, Any]:
    topo = cmap.topology
    return {"hosts": [{"name": h.name, "leaf": h.leaf, "pod": h.pod} for h in topo.hosts],
            "links": [{"name": link.name, "kind": str(link.kind), "owner": link.owner}
                      for link in topo.links]}


def state_json(cmap: CongestionMap, tokens: int, now: float | None = None) -> dict[str, Any]:
    """What the page draws, from one map."""
    now = time.time() if now is None else now
    conf = cmap.link_confidence(now)
    share = np.where(cmap.capacity > 0, cmap.util / np.maximum(cmap.capacity, 1.0), 0.0)
    available = cmap.available(now, conf)
    n = cmap.topology.n_hosts
    dsts = np.arange(n, dtype=np.int64)
    nbytes = float(tokens) * KV_BYTES_PER_TOKEN
    heat = [[_finite(float(s) * 1e3) for s in cmap.estimate(src, dsts, nbytes, now).seconds]
            for src in range(n)]
    age = now - cmap.created_ts if cmap.created_ts else None
    return {
        "version": cmap.version, "created_ts": cmap.created_ts,
        "age_s": None if age is None else round(max(age, 0.0), 3),
        "stale": age is None or age > STALE_S, "stale_after_s": STALE_S,
        "hot_share": HOT_SHARE, "tokens": tokens, "kv_bytes": nbytes,
        "links": [{"name": link.name, "share": _finite(float(share[i])),
                   "available_gbps": _finite(float(available[i]) * 8 / 1e9),
                   "capacity_gbps": _finite(float(cmap.capacity[i]) * 8 / 1e9),
                   "confidence": _finite(float(conf[i]))}
                  for i, link in enumerate(cmap.topology.links)],
        "transfer_ms": heat, "topology": topology_json(cmap),
    }


def _current(request: web.Request) -> CongestionMap:
    cmap = request.app[CURRENT]()
    if cmap is None:
        raise web.HTTPServiceUnavailable(reason="no congestion map yet")
    return cmap


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_asset("view.html"), content_type="text/html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _ASSETS:
        raise web.HTTPNotFound(reason=f"no asset {name!r}")
    return web.Response(body=_asset(name), content_type=_ASSETS[name])


async def state(request: web.Request) -> web.Response:
    body = state_json(_current(request), _tokens(request))
    return web.json_response(body, dumps=lambda o: json.dumps(o, allow_nan=False))


async def events(request: web.Request) -> web.StreamResponse:
    """SSE: one ``map`` event per new version, a ``map`` event at least every second (its
    age grows while no version comes), ``nomap`` while the oracle has none."""
    tokens = _tokens(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    sent_version, sent_at = -1, 0.0
    closing = request.app[CLOSING]
    try:
        while not closing.is_set():
            cmap = request.app[CURRENT]()
            now = time.monotonic()
            if cmap is None:
                await response.write(b"event: nomap\ndata: {}\n\n")
            elif cmap.version != sent_version or now - sent_at >= HEARTBEAT_S:
                data = json.dumps(state_json(cmap, tokens), allow_nan=False)
                await response.write(f"event: map\ndata: {data}\n\n".encode())
                sent_version, sent_at = cmap.version, now
            await asyncio.sleep(POLL_S)
    except ConnectionResetError:
        pass  # the page went away
    return response


def add_routes(app: web.Application, current_map: MapGetter) -> None:
    """Register the view next to the oracle's API (one call from ``build_app``). Open event
    streams end when the app shuts down, so they never hold up the oracle's stop."""
    app[CURRENT] = current_map
    app[CLOSING] = asyncio.Event()

    async def closing(app: web.Application) -> None:
        app[CLOSING].set()
    app.on_shutdown.append(closing)
    app.router.add_get("/view", page)
    app.router.add_get("/view/static/{name}", static)
    app.router.add_get("/view/state", state)
    app.router.add_get("/view/events", events)


__all__ = ["add_routes", "state_json"]
