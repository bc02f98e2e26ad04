"""The scheduler's aiohttp application: decode selection over HTTP.

Endpoints (see :mod:`netkv_scheduler.openapi` for the schemas): ``POST /v1/select``,
``POST /v1/release``, ``GET``/``POST /v1/instances``, ``GET /healthz``, ``GET /readyz``,
``GET /metrics``, ``GET /openapi.json``. Bodies are validated by checkers compiled from the
OpenAPI document; bad input gets a 4xx JSON error naming the field and is counted in
``netkv_bad_requests_total{field}``. The decisions themselves are :mod:`netkv.routing`'s; the
map consumer, the load scraper and the reservation sweeper run under the app's
:class:`~netkv.supervisor.Supervisor`, and a dead one makes ``/readyz`` degraded.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from netkv.core.topology import Topology
from netkv.core.topology_file import load_topology
from netkv.errors import InputError
from netkv.routing import (
    Choice,
    InstanceReport,
    MapFeed,
    ReleaseRequest,
    Selector,
    SelectRequest,
    spawn_routing,
)
from netkv.supervisor import Supervisor
from netkv_scheduler import openapi
from netkv_scheduler.settings import SchedulerSettings

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SETTINGS = web.AppKey("settings", SchedulerSettings)
SELECTOR = web.AppKey("selector", Selector)
FEED = web.AppKey("feed", MapFeed)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
CHECKERS = web.AppKey("checkers", dict[str, openapi.Checker])
DOCUMENT = web.AppKey("document", bytes)

_INDEX = re.compile(r"\[\d+\]")


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, policies: tuple[str, ...], fields: set[str], feed: MapFeed) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decision = Histogram(
            "netkv_decision_duration_seconds", "time to choose a decoder (in-process)",
            ["policy"], registry=r,
            buckets=(25e-6, 50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 1e-3, 2e-3, 5e-3, 1e-2,
                     5e-2))
        self.decision_by_policy = {p: self.decision.labels(p) for p in policies}
        self.transfer = Histogram(
            "netkv_kv_transfer_predicted_seconds", "predicted KV transfer time of choices",
            ["tier"], registry=r,
            buckets=(1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.transfer_by_tier = {t: self.transfer.labels(str(t)) for t in range(4)}
        self.decisions = Counter("netkv_decisions_total", "decisions made",
                                 ["policy", "tier", "map"], registry=r)
        self.decisions_by = {(p, t, m): self.decisions.labels(p, str(t), m)
                             for p in policies for t in range(4) for m in ("map", "prior")}
        self.bad = Counter("netkv_bad_requests_total", "rejected requests by field",
                           ["field"], registry=r)
        self.fields = fields
        self.releases = Counter("netkv_releases_total", "releases by outcome", ["found"],
                                registry=r)
        Gauge("netkv_map_age_seconds", "age of the congestion map in use (-1: none)",
              registry=r).set_function(
            lambda: -1.0 if feed.view().age_s is None else float(feed.view().age_s or 0.0))
        Gauge("netkv_map_version", "version of the congestion map held (-1: none)",
              registry=r).set_function(lambda: float(-1 if feed.version is None
                                                     else feed.version))
        Gauge("netkv_map_stale", "1 when decisions use tier priors", registry=r) \
            .set_function(lambda: float(feed.view().stale))
        Gauge("netkv_mqtt_connected", "1 while the broker connection is up", registry=r) \
            .set_function(lambda: float(feed.mqtt_connected))
        Gauge("netkv_redis_ok", "1 while the last Redis call succeeded", registry=r) \
            .set_function(lambda: float(bool(feed.redis_ok)))
        Gauge("netkv_map_rejected", "map snapshots/announcements rejected", registry=r) \
            .set_function(lambda: float(feed.rejected_total))

    def bad_request(self, where: str) -> None:
        label = _INDEX.sub("[]", where)
        self.bad.labels(label if label in self.fields else "other").inc()


METRICS = web.AppKey("metrics", Metrics)


def _field_labels(schemas: dict[str, openapi.JSON]) -> set[str]:
    labels = {"body", "auth", "other"}

    def walk(schema: openapi.JSON, where: str) -> None:
        labels.add(where)
        for key, sub in schema.get("properties", {}).items():
            walk(sub, f"{where}.{key}")
        if "items" in schema:
            walk(schema["items"], f"{where}[]")
    for schema in schemas.values():
        walk(schema, "body")
    return labels


# -- helpers --------------------------------------------------------------------------------
def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def _error(app: web.Application, where: str, message: str, status: int = 400) -> web.Response:
    app[METRICS].bad_request(where)
    return _json({"error": f"{where}: {message}", "field": where}, status)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _body(request: web.Request, operation: str) -> Any:
    """Read, parse and validate a body; raises InputError / web.HTTPException subclasses."""
    app = request.app
    token = app[SETTINGS].token
    if token is not None:
        given = request.headers.get("Authorization", "")
        if not (given.startswith("Bearer ")
                and hmac.compare_digest(given[7:].encode(), token.encode())):
            raise _UnauthorizedError
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _TooLargeError("body", f"larger than {app[SETTINGS].max_body_bytes} bytes") \
            from None
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InputError("body", f"not valid JSON: {str(exc)[:120]}") from None
    return app[CHECKERS][operation](data, "body")


class _UnauthorizedError(Exception):
    pass


class _TooLargeError(InputError):
    pass


def _status_of(exc: InputError) -> int:
    return 413 if isinstance(exc, _TooLargeError) else 400


# -- handlers -------------------------------------------------------------------------------
def _guarded(operation: str, inner: Callable[[web.Request, Any], web.Response]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            body = await _body(request, operation)
            return inner(request, body)
        except InputError as exc:
            return _error(request.app, exc.where, exc.message, _status_of(exc))
        except _UnauthorizedError:
            request.app[METRICS].bad_request("auth")
            resp = _json({"error": "missing or wrong bearer token", "field": "auth"}, 401)
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
    return handler


def _select(request: web.Request, body: Any) -> web.Response:
    app = request.app
    choice: Choice = app[SELECTOR].select(SelectRequest(
        request_id=body["request_id"], prefill=body["prefill"],
        prompt_tokens=body["prompt_tokens"], output_tokens=body["output_tokens"],
        block_hashes=tuple(body.get("block_hashes", ())), policy=body.get("policy"),
        reserve=body["reserve"]))
    d = choice.decision
    metrics = app[METRICS]
    metrics.decision_by_policy[choice.policy].observe(choice.duration_s)
    metrics.transfer_by_tier[d.tier].observe(d.transfer_s)
    metrics.decisions_by[choice.policy, d.tier, "prior" if choice.view.stale else "map"].inc()
    view = choice.view
    return _json({
        "request_id": body["request_id"],
        "decode": choice.decoder.name,
        "decode_host": choice.decoder.host,
        "prefill": choice.prefill.name,
        "predicted_ttft_ms": round(d.ttft_s * 1e3, 4),
        "breakdown": {"queue_ms": round(d.queue_s * 1e3, 4),
                      "transfer_ms": round(d.transfer_s * 1e3, 4),
                      "first_token_ms": round(d.first_token_s * 1e3, 4)},
        "tier": d.tier,
        "kv_bytes": d.transfer_bytes,
        "map_version": view.version,
        "map_age_ms": None if view.age_s is None else round(view.age_s * 1e3, 1),
        "map_stale": view.stale,
        "policy": choice.policy,
        "reserved": choice.reserved,
    })


def _release(request: web.Request, body: Any) -> web.Response:
    decoder = request.app[SELECTOR].release(ReleaseRequest(**body).request_id)
    request.app[METRICS].releases.labels(str(decoder is not None).lower()).inc()
    return _json({"request_id": body["request_id"], "released": decoder is not None,
                  "decode": None if decoder is None else decoder.name})


def _register(request: web.Request, body: Any) -> web.Response:
    info = request.app[SELECTOR].register(InstanceReport(**body))
    return _json({"name": info.name, "role": info.role, "host": info.host,
                  "source": info.source})


async def _instances(request: web.Request) -> web.Response:
    return _json(request.app[SELECTOR].describe())


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    feed = request.app[FEED]
    ready, reasons = feed.health()
    reasons += [f"background task {f.name} {f.reason}"
                for f in request.app[SUPERVISOR].failures]
    view = feed.view()
    status = "not ready" if not ready else ("degraded" if reasons else "ready")
    return _json({"status": status, "reasons": reasons, "map_version": view.version,
                  "map_age_s": view.age_s, "map_stale": view.stale,
                  "mqtt_connected": feed.mqtt_connected, "redis_ok": feed.redis_ok},
                 200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCUMENT], content_type="application/json")


# -- background tasks -----------------------------------------------------------------------
async def _background(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    async with app[SUPERVISOR] as supervisor:
        spawn_routing(supervisor, app[SELECTOR], scrape_interval_s=s.scrape_interval_s,
                      scrape_timeout_s=s.scrape_timeout_s)
        yield


def create_app(settings: SchedulerSettings, topology: Topology | None = None,
               feed: MapFeed | None = None) -> web.Application:
    """The scheduler app. ``feed`` defaults to one consuming the configured Redis and MQTT."""
    topology = topology or load_topology(settings.topology_path)
    if feed is None:
        feed = MapFeed(topology, settings.redis, settings.mqtt, stale_s=settings.map_stale_s,
                       poll_s=settings.map_poll_s, redis_timeout_s=settings.redis_timeout_s,
                       cache_s=settings.oracle_cache_s)
    selector = Selector(settings.selector_config(), topology, feed)
    policies = selector.policies
    schemas = {"select": openapi.select_request(policies, settings.max_block_hashes),
               "release": openapi.RELEASE_REQUEST, "register": openapi.INSTANCE_REQUEST}
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[FEED] = feed
    app[SELECTOR] = selector
    app[SUPERVISOR] = Supervisor("scheduler")
    app[CHECKERS] = {name: openapi.compile_schema(s) for name, s in schemas.items()}
    app[METRICS] = Metrics(policies, _field_labels(schemas), feed)
    app[DOCUMENT] = json.dumps(openapi.document(policies, settings.max_block_hashes,
                                                settings.token is not None)).encode()
    app.router.add_post("/v1/select", _guarded("select", _select))
    app.router.add_post("/v1/release", _guarded("release", _release))
    app.router.add_post("/v1/instances", _guarded("register", _register))
    app.router.add_get("/v1/instances", _instances)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    app.cleanup_ctx.append(_background)
    return app
