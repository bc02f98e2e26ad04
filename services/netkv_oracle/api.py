"""The oracle's HTTP API (aiohttp): the network cost oracle for schedulers and operators.

* ``GET /v1/cost?src=HOST&dst=HOST&bytes=N`` -> one estimate.
* ``POST /v1/costs`` ``{"src": HOST, "dsts": [HOST, ...], "bytes": N | [N, ...]}`` -> one
  estimate per destination (one source, many destinations: what a decision needs).
* ``GET /v1/map`` -> the map: per link utilisation, capacity, available bandwidth, queueing,
  age and confidence; per host liveness; the number of probed pairs. ``?format=msgpack``
  returns the versioned snapshot bytes (:func:`netkv.contracts.snapshot.encode_snapshot`).
* ``GET /healthz`` (the loops made progress recently), ``GET /readyz`` (a map is being
  served), ``GET /metrics`` (Prometheus).

Estimates carry ``seconds``, ``latency_s``, ``bandwidth_bytes_s``, ``tier``, ``age_s`` (null
when the figure is the prior alone), ``confidence`` and the ``map_version`` they come from.
Bad input gets a 4xx JSON body ``{"error": ..., "field": ...}``; never a 5xx.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from netkv.contracts.snapshot import encode_snapshot
from netkv.core.congestion import CongestionMap
from netkv.core.costmodel import CostEstimate
from netkv.errors import InputError
from netkv.http.middlewares import middlewares
from netkv_oracle import view
from netkv_oracle.metrics import OracleMetrics

MAX_DSTS = 100_000
MAX_BYTES = 1e15
MAX_BODY = 8 * 1024 * 1024


@dataclass
class ApiState:
    """What the handlers need: the map being served and liveness probes."""

    current_map: Callable[[], CongestionMap | None]
    healthy: Callable[[], tuple[bool, str]]
    ready: Callable[[], tuple[bool, str]]
    metrics: OracleMetrics


STATE: web.AppKey[ApiState] = web.AppKey("state", ApiState)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o,
                                                                              allow_nan=False))


def _error(status: int, field: str, message: str) -> web.Response:
    return _json({"error": message, "field": field}, status)


def _map(request: web.Request) -> CongestionMap:
    cmap = request.app[STATE].current_map()
    if cmap is None:
        raise web.HTTPServiceUnavailable(reason="no congestion map yet")
    return cmap


def _host(cmap: CongestionMap, value: Any, field: str) -> int:
    if not isinstance(value, str) or not value:
        raise InputError(field, "expected a host name")
    index = cmap.topology.host_index.get(value)
    if index is None:
        raise InputError(field, f"unknown host {value[:80]!r}")
    return index


def _bytes(value: Any, field: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(field, f"expected a number of bytes, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or not 0 <= value <= MAX_BYTES:
        raise InputError(field, f"expected a number of bytes in [0, {MAX_BYTES:g}]")
    return float(value)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _rows(cmap: CongestionMap, dsts: list[int], est: CostEstimate) -> list[dict[str, Any]]:
    hosts = cmap.topology.hosts
    return [{"dst": hosts[d].name, "seconds": float(est.seconds[i]),
             "latency_s": float(est.latency_s[i]),
             "bandwidth_bytes_s": float(est.bandwidth_bytes_s[i]), "tier": int(est.tier[i]),
             "age_s": _finite(est.age_s[i]), "confidence": float(est.confidence[i])}
            for i, d in enumerate(dsts)]


async def cost(request: web.Request) -> web.Response:
    cmap = _map(request)
    q = request.query
    for name in ("src", "dst", "bytes"):
        if name not in q:
            raise InputError(name, "missing query parameter")
    src, dst = _host(cmap, q["src"], "src"), _host(cmap, q["dst"], "dst")
    nbytes = _bytes(q["bytes"], "bytes")
    est = cmap.estimate(src, np.array([dst], dtype=np.int64), nbytes)
    return _json({"src": q["src"], "bytes": nbytes, "map_version": cmap.version,
                  **_rows(cmap, [dst], est)[0]})


async def costs(request: web.Request) -> web.Response:
    cmap = _map(request)
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise InputError("body", f"larger than {MAX_BODY} bytes")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise InputError("body", "not valid JSON") from None
    if not isinstance(body, dict):
        raise InputError("body", "expected a JSON object")
    extra = sorted(set(body) - {"src", "dsts", "bytes"})
    if extra:
        raise InputError(extra[0], "unknown field")
    for name in ("src", "dsts", "bytes"):
        if name not in body:
            raise InputError(name, "missing field")
    src = _host(cmap, body["src"], "src")
    raw_dsts = body["dsts"]
    if not isinstance(raw_dsts, list) or not 0 < len(raw_dsts) <= MAX_DSTS:
        raise InputError("dsts", f"expected a list of 1 to {MAX_DSTS} host names")
    dsts = [_host(cmap, d, f"dsts[{i}]") for i, d in enumerate(raw_dsts)]
    raw_bytes = body["bytes"]
    nbytes: Any
    if isinstance(raw_bytes, list):
        if len(raw_bytes) != len(dsts):
            raise InputError("bytes", f"expected one value per destination ({len(dsts)})")
        nbytes = np.array([_bytes(b, f"bytes[{i}]") for i, b in enumerate(raw_bytes)])
    else:
        nbytes = _bytes(raw_bytes, "bytes")
    est = cmap.estimate(src, np.array(dsts, dtype=np.int64), nbytes)
    return _json({"src": body["src"], "map_version": cmap.version,
                  "costs": _rows(cmap, dsts, est)})


async def map_view(request: web.Request) -> web.StreamResponse:
    cmap = _map(request)
    fmt = request.query.get("format", "json")
    if fmt == "msgpack":
        return web.Response(body=encode_snapshot(cmap, cmap.version, cmap.created_ts),
                            content_type="application/msgpack")
    if fmt != "json":
        raise InputError("format", "expected json or msgpack")
    now = cmap.clock()
    age, conf, avail = cmap.link_age(now), cmap.link_confidence(now), cmap.available(now)
    alive = cmap.hosts_alive(now)
    links = [{"name": lk.name, "kind": str(lk.kind), "util_bytes_s": float(cmap.util[i]),
              "capacity_bytes_s": float(cmap.capacity[i]),
              "available_bytes_s": float(avail[i]), "prior_bytes_s": float(cmap.prior[i]),
              "queue_s": float(cmap.queue_s[i]), "age_s": _finite(age[i]),
              "confidence": float(conf[i])}
             for i, lk in enumerate(cmap.topology.links)]
    hosts = [{"name": h.name, "alive": bool(alive[i]),
              "seen_age_s": _finite(now - cmap.host_seen_ts[i]) if cmap.host_seen_ts[i] > 0
              else None} for i, h in enumerate(cmap.topology.hosts)]
    return _json({"version": cmap.version, "created_ts": cmap.created_ts,
                  "age_s": max(now - cmap.created_ts, 0.0) if cmap.created_ts else None,
                  "params": {"fresh_s": cmap.params.fresh_s, "stale_s": cmap.params.stale_s},
                  "links": links, "hosts": hosts, "pairs": len(cmap.pairs)})


async def healthz(request: web.Request) -> web.Response:
    ok, why = request.app[STATE].healthy()
    return _json({"ok": ok, "detail": why}, 200 if ok else 503)


async def readyz(request: web.Request) -> web.Response:
    ok, why = request.app[STATE].ready()
    return _json({"ok": ok, "detail": why}, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cmap = state.current_map()
    if cmap is not None and cmap.created_ts:
        state.metrics.map_age.set(max(time.time() - cmap.created_ts, 0.0))
        state.metrics.links_fresh.set(int((cmap.link_confidence() > 0).sum()))
    return web.Response(body=generate_latest(state.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(state: ApiState) -> web.Application:
    # The shared HTTP edge (netkv.http): JSON errors for every status, JSON-only bodies (415),
    # body limits; the oracle's API has no mutating endpoint, so no token.
    app = web.Application(middlewares=middlewares(token=None, max_body_bytes=MAX_BODY),
                          client_max_size=MAX_BODY)
    app[STATE] = state
    app.router.add_get("/v1/cost", cost)
    app.router.add_post("/v1/costs", costs)
    app.router.add_get("/v1/map", map_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    view.add_routes(app, state.current_map)  # the live congestion view (view.py)
    return app
