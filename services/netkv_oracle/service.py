"""The oracle service: ingest, leadership, publishing and HTTP under one owner.

``async with OracleService(settings, topology) as oracle: await oracle.serve_forever()``.
Every background task is owned by one :class:`~netkv.supervisor.Supervisor`: a task that dies
is logged and turns ``/healthz`` and ``/readyz`` to 503 naming it. Leaving the context cancels
them, releases the leader lock (so a standby takes over at once), stops the HTTP site and
closes the Redis client, in that order and with bounded waits; a start-up that fails half-way
undoes what it had started (runner, tasks, client) before the error propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import structlog
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from netkv.adapters.redis_client import connect_redis
from netkv.config import RedisSettings, reveal
from netkv.contracts.names import RedisKeys
from netkv.core.congestion import CongestionMap, MapParams
from netkv.core.tomography import localise_inflation
from netkv.core.topology import Topology
from netkv.http.server import HttpLimits, serving
from netkv.supervisor import Supervisor
from netkv_oracle.api import ApiState, build_app
from netkv_oracle.builder import MapBuilder
from netkv_oracle.identity import Ownership
from netkv_oracle.ingest import Ingestor
from netkv_oracle.metrics import OracleMetrics
from netkv_oracle.publisher import Announcer, Leadership, Publisher, load_snapshot
from netkv_oracle.settings import OracleSettings

log = structlog.get_logger(__name__)

AnyRedis = Redis | RedisCluster
HEALTH_WINDOW_S = 10.0


def redis_for(settings: RedisSettings, *, cluster: bool) -> AnyRedis:
    """A standalone client, or a cluster client that follows slots across primaries; both
    run the same ingest and publish code."""
    if not cluster:
        return connect_redis(settings)
    client: RedisCluster = RedisCluster.from_url(
        settings.url, username=settings.username, password=reveal(settings.password),
        socket_timeout=settings.timeout_s, socket_connect_timeout=settings.timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3))
    return client


class OracleService:
    """One oracle process (leader or hot standby)."""

    def __init__(self, settings: OracleSettings, topology: Topology, *,
                 clock: Callable[[], float] = time.time, mqtt: bool = True) -> None:
        self.settings = settings
        self.topology = topology
        self.clock = clock
        self.oracle_id = settings.oracle_id or f"{socket.gethostname()}-{os.getpid()}"
        self.keys = RedisKeys(settings.redis.prefix)
        self.metrics = OracleMetrics()
        self.params = MapParams(fresh_s=settings.fresh_s, stale_s=settings.stale_s,
                                min_share=settings.min_share)
        self.builder = MapBuilder(topology, self.params, clock)
        self.redis = redis_for(settings.redis, cluster=settings.cluster)
        self.ownership = Ownership(topology, settings.require_registered_nics)
        self.ingestor = Ingestor(
            self.redis, self.keys, self.oracle_id, self.builder, ownership=self.ownership,
            metrics=self.metrics,
            read_count=settings.read_count, block_ms=settings.read_block_ms,
            claim_idle_s=settings.claim_idle_s, clock=clock)
        self.leadership = Leadership(self.redis, self.keys, self.oracle_id,
                                     settings.leader_ttl_s, self.metrics)
        self.announcer = Announcer(settings.mqtt, f"netkv-oracle-{self.oracle_id}",
                                   self.metrics) if mqtt else None
        self.publisher = Publisher(self.redis, self.keys, self.leadership,
                                   announcer=self.announcer, metrics=self.metrics, clock=clock)
        self.leading = False  # leader *and* seeded from the predecessor's map
        self.followed: CongestionMap | None = None
        self._tick = time.monotonic()
        self.supervisor = Supervisor(f"oracle-{self.oracle_id}", stop_timeout_s=5.0)
        self._http: contextlib.AsyncExitStack | None = None
        self.port = 0

    # -- what is served -------------------------------------------------------------------
    def current_map(self) -> CongestionMap | None:
        if self.leading:
            return self.builder.map
        return self.followed

    def _healthy(self) -> tuple[bool, str]:
        idle = time.monotonic() - self._tick
        dead = self._dead()
        if dead:
            return False, dead
        if idle > HEALTH_WINDOW_S:
            return False, f"publish loop stalled for {idle:.1f} s"
        return True, "leader" if self.leading else "standby"

    def _dead(self) -> str:
        failures = self.supervisor.failures
        if not failures:
            return ""
        return "background task died: " + "; ".join(f"{f.name} {f.reason}" for f in failures)

    def _ready(self) -> tuple[bool, str]:
        dead = self._dead()
        if dead:
            return False, dead
        cmap = self.current_map()
        if cmap is None:
            return False, "no map yet (standby without a published snapshot)"
        return True, f"serving map version {cmap.version}"

    # -- loops ----------------------------------------------------------------------------
    def _ingest_active(self) -> bool:
        return self.leading and self.leadership.is_leader

    async def _publish_loop(self) -> None:
        s = self.settings
        last = last_tomography = 0.0
        while True:
            await asyncio.sleep(s.publish_interval_s)
            self._tick = time.monotonic()
            try:
                if not self.leadership.is_leader:
                    if self.leading:
                        log.info("lost leadership; standing by")
                    self.leading = False
                    await self._follow()
                    continue
                if not self.leading:
                    await self._take_over()
                now = time.monotonic()
                if self.builder.changed or now - last >= s.republish_s:
                    changed = self.builder.changed
                    self.builder.changed = False
                    if s.tomography and now - last_tomography >= s.sample_interval_s:
                        last_tomography = now  # new RTT windows arrive once per interval
                        localise_inflation(self.builder.map)
                    if await self.publisher.publish(self.builder.map) is None:
                        self.builder.changed = changed
                    else:
                        last = now
            except (RedisError, OSError) as exc:
                self.metrics.redis_errors.labels("publish").inc()
                log.warning("publish failed", error=str(exc))

    async def _take_over(self) -> None:
        """Become the active oracle: continue from the newest published map."""
        seed = await load_snapshot(self.redis, self.keys, self.topology,
                                   newer_than=self.publisher.version, clock=self.clock)
        if seed is not None:
            self.builder.seed(seed)
            self.publisher.version = max(self.publisher.version, seed.version)
        self.builder.map.epoch = self.publisher.new_term()
        self.leading = True
        self.ingestor.rediscover.set()
        log.info("leading", oracle=self.oracle_id, seeded_from=seed.version if seed else None)

    async def _follow(self) -> None:
        held = self.followed.version if self.followed is not None else -1
        epoch = self.followed.epoch if self.followed is not None else None
        cmap = await load_snapshot(self.redis, self.keys, self.topology, newer_than=held,
                                   epoch=epoch, clock=self.clock)
        if cmap is not None:
            self.followed = cmap
            self.metrics.map_version.set(cmap.version)
            self.metrics.map_created.set(cmap.created_ts)

    # -- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._close()  # nothing started half-way is left behind
            raise
        log.info("oracle started", oracle=self.oracle_id, port=self.port,
                 hosts=self.topology.n_hosts, links=self.topology.n_links)
        return self

    async def _start(self) -> None:
        app = build_app(ApiState(self.current_map, self._healthy, self._ready, self.metrics))
        # The shared server: header/body/idle deadlines and a connection cap, as the scheduler.
        self._http = contextlib.AsyncExitStack()
        served = await self._http.enter_async_context(
            serving(app, self.settings.http_host, self.settings.http_port, HttpLimits()))
        self.port = served.port
        s = self.settings
        sup = await self.supervisor.__aenter__()
        sup.spawn(self.leadership.run(), name="leadership")
        sup.spawn(self._publish_loop(), name="publish")
        sup.spawn(self.ingestor.housekeeping_loop(
            self._ingest_active, s.discover_interval_s, s.claim_idle_s), name="discover")
        for shard in range(self.keys.shards):
            sup.spawn(self.ingestor.shard_loop(shard, self._ingest_active),
                      name=f"shard-{shard}")
        if self.announcer is not None:
            sup.spawn(self.announcer.run(), name="mqtt")

    async def serve_forever(self) -> None:
        await asyncio.Event().wait()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close()

    async def _close(self) -> None:
        await self.supervisor.stop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.leadership.release()
        if self._http is not None:
            http, self._http = self._http, None
            async with asyncio.timeout(5.0):
                await http.aclose()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.redis.aclose()
