"""The scheduler's aiohttp application: decode selection over HTTP.

Endpoints: ``POST /v1/select``, ``POST /v1/release``, ``GET``/``POST``/``DELETE
/v1/instances``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``, ``GET /openapi.json``.
Bodies decode straight into their msgspec Structs (:mod:`netkv.routing.requests`, answers in
:mod:`netkv_scheduler.schema`); the OpenAPI document is generated from them. Auth, JSON-only,
body limits and JSON errors are the shared middlewares of :mod:`netkv.http`; bad input gets a
4xx JSON error naming the field and is counted in ``netkv_bad_requests_total{field}``. The
decisions are :mod:`netkv.routing`'s; the map consumer, the load scraper and the reservation
sweeper run under the app's :class:`~netkv.supervisor.Supervisor`, and a dead one makes
``/readyz`` degraded.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from netkv.adapters.topology_file import load_topology
from netkv.core.topology import Topology
from netkv.errors import InputError
from netkv.http.bodies import encode, json_response, peer_gone, read_body
from netkv.http.middlewares import error_response, middlewares
from netkv.http.openapi import JSON, Operation, document
from netkv.routing import (
    InstanceReport,
    MapFeed,
    ReleaseRequest,
    Selector,
    SelectRequest,
    spawn_routing,
)
from netkv.routing.instances import RegistryFullError
from netkv.supervisor import Supervisor
from netkv_scheduler import decisions
from netkv_scheduler.metrics import DecisionSeries
from netkv_scheduler.schema import (
    Breakdown,
    HealthResponse,
    InstanceEntry,
    InstancesResponse,
    ReadyResponse,
    RegisterResponse,
    ReleaseResponse,
    RemoveResponse,
    SelectResponse,
)
from netkv_scheduler.settings import SchedulerSettings

log = structlog.get_logger(__name__)

SETTINGS = web.AppKey("settings", SchedulerSettings)
SELECTOR = web.AppKey("selector", Selector)
FEED = web.AppKey("feed", MapFeed)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
DOCUMENT = web.AppKey("document", bytes)

_INDEX = re.compile(r"\[\d+\]")
BODIES: tuple[type[msgspec.Struct], ...] = (SelectRequest, ReleaseRequest, InstanceReport)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, policies: tuple[str, ...], feed: MapFeed, selector: Selector) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The per-decision series (netkv_decision_duration_seconds{policy},
        # netkv_kv_transfer_predicted_seconds{tier}, netkv_decisions_total{policy,tier,map}).
        self.series = DecisionSeries(policies)
        r.register(self.series)
        self.bad = Counter("netkv_bad_requests_total", "rejected requests by field",
                           ["field"], registry=r)
        self.fields = _field_labels()
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
        r.register(_FeedErrors(feed))
        Gauge("netkv_prefix_blocks", "blocks in the prefix index (bounded)", registry=r) \
            .set_function(lambda: float(len(selector.prefixes)))
        Gauge("netkv_open_reservations", "open bookings", registry=r) \
            .set_function(lambda: float(len(selector.reservations.open)))
        Gauge("netkv_instances", "instances known (topology and registered)", registry=r) \
            .set_function(lambda: float(len(selector.registry.by_name)))

    def bad_request(self, where: str) -> None:
        label = _INDEX.sub("[]", where)
        self.bad.labels(label if label in self.fields else "other").inc()


class _FeedErrors(Collector):
    """``netkv_map_feed_errors_total{reason}``: every kind of map-feed failure, counted."""

    def __init__(self, feed: MapFeed) -> None:
        self.feed = feed

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily("netkv_map_feed_errors", "map feed failures by reason",
                                     labels=["reason"])
        for reason, count in sorted(self.feed.errors_by_reason.items()):
            family.add_metric([reason], count)
        yield family


METRICS = web.AppKey("metrics", Metrics)


def _field_labels() -> set[str]:
    """Every field a rejection may name (a bounded label set: unknown names are "other")."""
    labels = {"body", "auth", "other", "path", "method", "content-type",
              "body.block_hashes[]"}
    for struct in BODIES:
        labels |= {f"body.{name}" for name in struct.__struct_fields__}
    return labels


# -- handlers -------------------------------------------------------------------------------
def check_select(body: SelectRequest, max_block_hashes: int,
                 policies: Collection[str]) -> SelectRequest:
    """The checks that depend on settings (the Struct holds the fixed bounds)."""
    if len(body.block_hashes) > max_block_hashes:
        raise InputError("body.block_hashes", f"at most {max_block_hashes} items, "
                         f"got {len(body.block_hashes)}")
    if body.policy is not None and body.policy not in policies:
        raise InputError("body.policy", f"must be one of {', '.join(policies)}, "
                         f"got {body.policy[:64]!r}")
    return body


def _select_handler(app: web.Application, settings: SchedulerSettings, selector: Selector,
                    metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``POST /v1/select``, its app's parts bound once (not looked up per request)."""
    max_block_hashes, timeout_s = settings.max_block_hashes, settings.body_timeout_s
    policies, series = selector.engines, metrics.series
    keep = decisions.keeper(app)
    kept: dict[float, float] = {}

    def ms4(seconds: float) -> float:
        """``round(seconds * 1e3, 4)``, kept for the values that recur (the first-token time,
        a queue wait): one decimal rounding costs about 1 µs. A zero is itself (its sign
        kept, as ``round`` keeps it; -0.0 == 0.0 would share a key); NaN is not kept."""
        if seconds == 0.0:
            return seconds * 1e3
        hit = kept.get(seconds)
        if hit is None:
            hit = round(seconds * 1e3, 4)
            if not math.isnan(seconds):
                if len(kept) >= 256:
                    kept.clear()
                kept[seconds] = hit
        return hit

    async def _select(request: web.Request) -> web.Response:
        body = check_select(await read_body(request, SelectRequest, timeout_s=timeout_s),
                            max_block_hashes, policies)
        choice = selector.select(body)
        d = choice.decision
        if choice.reserved and peer_gone(request):
            # The client gave up before its answer (e.g. it timed out during a stall): its
            # booking would count as invisible load until it expired.
            selector.release(body.request_id)
            metrics.releases.labels("client_gone").inc()
        view = choice.view
        series.record(choice.policy, d.tier, view.stale, choice.duration_s, d.transfer_s)
        body_bytes = encode(SelectResponse(
            request_id=body.request_id, decode=choice.decoder.name,
            decode_host=choice.decoder.host, prefill=choice.prefill.name,
            predicted_ttft_ms=round(d.ttft_s * 1e3, 4),
            breakdown=Breakdown(queue_ms=ms4(d.queue_s),
                                transfer_ms=round(d.transfer_s * 1e3, 4),
                                first_token_ms=ms4(d.first_token_s)),
            tier=d.tier, kv_bytes=d.transfer_bytes, map_version=view.version,
            map_age_ms=None if view.age_s is None else round(view.age_s * 1e3, 1),
            map_stale=view.stale, policy=choice.policy, reserved=choice.reserved))
        keep(body_bytes)
        return web.Response(body=body_bytes, content_type="application/json")
    return _select


async def _release(request: web.Request) -> web.Response:
    body = await read_body(request, ReleaseRequest,
                           timeout_s=request.app[SETTINGS].body_timeout_s)
    decoder = request.app[SELECTOR].release(body.request_id)
    request.app[METRICS].releases.labels(str(decoder is not None).lower()).inc()
    return json_response(ReleaseResponse(request_id=body.request_id,
                                         released=decoder is not None,
                                         decode=None if decoder is None else decoder.name))


async def _register(request: web.Request) -> web.Response:
    body = await read_body(request, InstanceReport,
                           timeout_s=request.app[SETTINGS].body_timeout_s)
    selector = request.app[SELECTOR]
    try:
        info = selector.register(body)
    except RegistryFullError as exc:
        request.app[METRICS].bad_request(exc.where)
        return error_response(429, exc.where, exc.message)
    expires = None if info.expires_ts is None else round(info.expires_ts - selector.clock(), 3)
    return json_response(RegisterResponse(name=info.name, role=info.role, host=info.host,
                                          source=info.source, expires_in_s=expires))


async def _remove(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        removed = request.app[SELECTOR].remove([name])
    except InputError as exc:
        raise InputError("name", exc.message) from None
    return json_response(RemoveResponse(name=name, removed=bool(removed)))


def _describe(selector: Selector) -> InstancesResponse:
    selector.sweep()
    reg, now = selector.registry, selector.clock()
    out: list[InstanceEntry] = []
    for info in reg.by_name.values():
        entry = InstanceEntry(name=info.name, role=info.role, host=info.host,
                              source=info.source)
        if info.role == "decode":
            load = reg.load_of(info)
            entry.running, entry.waiting, entry.kv_use = load.running, load.waiting, \
                load.kv_use
            entry.capacity_tokens = load.capacity_tokens
            entry.reservations = int(selector.reservations.pending[info.index])
        if info.metrics_url:
            entry.scraped = True
            entry.scrape_error = info.scrape_error
        if info.updated_ts:
            entry.load_age_s = round(max(now - info.updated_ts, 0.0), 3)
        if info.expires_ts is not None:
            entry.expires_in_s = round(max(info.expires_ts - now, 0.0), 3)
        out.append(entry)
    return InstancesResponse(
        instances=out, open_reservations=len(selector.reservations.open),
        transfers_in_flight=selector.bookings.active,
        expired_total=selector.reservations.expired_total,
        released_total=selector.reservations.released_total)


async def _instances(request: web.Request) -> web.Response:
    return json_response(_describe(request.app[SELECTOR]))


async def _healthz(request: web.Request) -> web.Response:
    return json_response(HealthResponse(status="ok"))


async def _readyz(request: web.Request) -> web.Response:
    feed = request.app[FEED]
    ready, reasons = feed.health()
    reasons += [f"background task {f.name} {f.reason}"
                for f in request.app[SUPERVISOR].failures]
    view = feed.view()
    status = "not ready" if not ready else ("degraded" if reasons else "ready")
    return json_response(ReadyResponse(
        status=status, reasons=reasons, map_version=view.version, map_age_s=view.age_s,
        map_stale=view.stale, mqtt_connected=feed.mqtt_connected, redis_ok=feed.redis_ok,
        feed_alive=request.app[SUPERVISOR].healthy and not feed.loop_failures_recent(),
        silent_agents=feed.silent_agents()), 200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCUMENT], content_type="application/json")


# -- the document ---------------------------------------------------------------------------
MUTATING_ERRORS = (400, 408, 413, 415)


def operations() -> list[Operation]:
    return [
        Operation("POST", "/v1/select", "select", "choose the decode instance for a "
                  "request (and book it)", SelectRequest, SelectResponse, MUTATING_ERRORS,
                  secured=True),
        Operation("POST", "/v1/release", "release", "end a reservation (idempotent)",
                  ReleaseRequest, ReleaseResponse, MUTATING_ERRORS, secured=True),
        Operation("GET", "/v1/instances", "instances", "instances, load, bookings",
                  response=InstancesResponse),
        Operation("POST", "/v1/instances", "register", "register an instance or refresh "
                  "its load", InstanceReport, RegisterResponse, (*MUTATING_ERRORS, 429),
                  secured=True),
        Operation("DELETE", "/v1/instances/{name}", "remove", "remove a registered "
                  "instance (its bookings end)", response=RemoveResponse, errors=(400,),
                  secured=True),
        Operation("GET", "/healthz", "healthz", response=HealthResponse),
        Operation("GET", "/readyz", "readyz", "ready (maybe degraded: see reasons)",
                  response=ReadyResponse, responses={
                      "503": {"description": "not ready: no congestion map yet"}}),
        Operation("GET", "/metrics", "metrics", responses={"200": {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}),
    ]


def openapi_document(policies: tuple[str, ...], auth: bool,
                     max_block_hashes: int = 65536) -> JSON:
    """The document; the policy names and the block-hash limit are known at run time."""
    def patch(schemas: JSON) -> None:
        props = schemas["SelectRequest"]["properties"]
        props["block_hashes"]["maxItems"] = max_block_hashes
        props["policy"] = {"type": "string", "enum": list(policies), "nullable": True,
                           "default": None,
                           "description": "a registered policy (default: the configured)"}
    doc = document("NetKV scheduler", "Network-aware decode-instance selection.",
                   operations(), auth=auth, patch=patch)
    # Request bodies inline their schema (no $ref), so a client or a fuzzer can narrow it.
    schemas = doc["components"]["schemas"]
    for item in doc["paths"].values():
        for op in item.values():
            content = op.get("requestBody", {}).get("content", {}).get("application/json")
            if content and "$ref" in content["schema"]:
                content["schema"] = dict(schemas[content["schema"]["$ref"].rsplit("/", 1)[1]])
    return doc


# -- background tasks -----------------------------------------------------------------------
async def _background(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    async with app[SUPERVISOR] as supervisor:
        spawn_routing(supervisor, app[SELECTOR], scrape_interval_s=s.scrape_interval_s,
                      scrape_timeout_s=s.scrape_timeout_s, max_scrape_bytes=s.max_scrape_bytes)
        yield


def create_app(settings: SchedulerSettings, topology: Topology | None = None,
               feed: MapFeed | None = None) -> web.Application:
    """The scheduler app. ``feed`` defaults to one consuming the configured Redis and MQTT."""
    topology = topology or load_topology(settings.topology_path)
    if feed is None:
        feed = MapFeed(topology, settings.redis, settings.mqtt, stale_s=settings.map_stale_s,
                       poll_s=settings.map_poll_s, redis_timeout_s=settings.redis_timeout_s,
                       cache_s=settings.oracle_cache_s, silent_s=settings.agent_silent_s)
    selector = Selector(settings.selector_config(), topology, feed)
    metrics = Metrics(selector.policies, feed, selector)
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares(
        token=settings.token, max_body_bytes=settings.max_body_bytes,
        on_bad=metrics.bad_request))
    app[SETTINGS] = settings
    app[FEED] = feed
    app[SELECTOR] = selector
    app[SUPERVISOR] = Supervisor("scheduler")
    app[METRICS] = metrics
    app[DOCUMENT] = encode(openapi_document(selector.policies, settings.token is not None,
                                            settings.max_block_hashes))
    # GET /v1/decisions/recent, for the oracle's live view (_select keeps its answers)
    decisions.install(app, signal=False)
    app.router.add_post("/v1/select", _select_handler(app, settings, selector, metrics))
    app.router.add_post("/v1/release", _release)
    app.router.add_post("/v1/instances", _register)
    app.router.add_get("/v1/instances", _instances)
    app.router.add_delete("/v1/instances/{name}", _remove)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    app.cleanup_ctx.append(_background)
    return app
