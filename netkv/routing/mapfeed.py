"""The latest congestion map, kept in memory and never waited for by a decision.

Versions are pushed over MQTT (the retained ``map/version`` announcement); the snapshot itself
is read from Redis at start, on every announcement newer than the map held, and by a slow
poll of the version key, which also catches versions announced while the broker was away.
Snapshots are decoded off the event loop. Decisions read :meth:`MapFeed.view`, a plain
attribute read: if the map is missing or older than ``stale_s`` they use the tier priors and
say so; broker and Redis trouble only shows up as ``degraded`` in ``/readyz``. The cost model
is the map's own (:meth:`CongestionMap.cached`, re-read every ``cache_s``); this module only
decides which map, or the prior, a decision uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt
import redis.asyncio as aioredis
import structlog

from netkv.adapters.mqtt_client import messages, reconnecting
from netkv.adapters.redis_client import connect_redis
from netkv.config import MqttSettings, RedisSettings
from netkv.contracts.announcement import announced_version
from netkv.contracts.names import MqttTopics, RedisKeys
from netkv.contracts.snapshot import SnapshotError, decode_snapshot, snapshot_header
from netkv.core.congestion import CongestionMap
from netkv.core.costmodel import CostOracle, static_tier_oracle
from netkv.core.paths import CachedOracle
from netkv.core.topology import Topology
from netkv.supervisor import Supervisor

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class MapView:
    """What one decision uses: the oracle and where it came from."""

    oracle: CostOracle
    version: int | None  # None: no map held
    age_s: float | None
    stale: bool  # True: tier priors are in use (no map, or too old)


class MapFeed:
    """The map a router decides with; :meth:`spawn` starts its consumer loops."""

    def __init__(self, topology: Topology, redis: RedisSettings | None,
                 mqtt: MqttSettings | None, *, stale_s: float = 10.0, poll_s: float = 2.0,
                 redis_timeout_s: float = 1.0, cache_s: float = 0.1,
                 clock: Callable[[], float] = time.time) -> None:
        self.topology = topology
        self.redis_settings = redis
        self.mqtt_settings = mqtt
        self.stale_s = stale_s
        self.poll_s = poll_s
        self.redis_timeout_s = redis_timeout_s
        self.cache_s = cache_s
        self.clock = clock
        self.keys = RedisKeys(redis.prefix) if redis else RedisKeys()
        self.topics = MqttTopics(mqtt.prefix) if mqtt else MqttTopics()
        self.prior = CachedOracle(static_tier_oracle(topology))
        self.map: CongestionMap | None = None
        self._oracle: CostOracle = self.prior
        self.version: int | None = None
        self.created_ts: float | None = None
        self.mqtt_connected = False
        self.redis_ok: bool | None = None  # None: not tried yet
        self.redis_error: str | None = None
        self.rejected_total = 0
        self.fetched_total = 0
        self.announced: int | None = None
        self._wake = asyncio.Event()

    # -- decisions ------------------------------------------------------------------------
    def view(self, now: float | None = None) -> MapView:
        """The oracle to decide with (never blocks, never does I/O)."""
        if self.version is None or self.created_ts is None:
            return MapView(self.prior, None, None, True)
        now = self.clock() if now is None else now
        age = max(now - self.created_ts, 0.0)
        if age > self.stale_s:
            return MapView(self.prior, self.version, age, True)
        return MapView(self._oracle, self.version, age, False)

    def install(self, cmap: CongestionMap) -> bool:
        """Adopt ``cmap`` if it is newer than the map held."""
        if self.version is not None and cmap.version <= self.version:
            return False
        self.map = cmap
        self._oracle = cmap.cached(self.cache_s, self.clock)
        self.version = cmap.version
        self.created_ts = cmap.created_ts
        log.info("map installed", version=cmap.version)
        return True

    def health(self) -> tuple[bool, list[str]]:
        """(ready, reasons for degraded): not ready without any map."""
        reasons: list[str] = []
        view = self.view()
        if self.mqtt_settings is not None and not self.mqtt_connected:
            reasons.append("mqtt broker unreachable")
        if self.redis_settings is not None and self.redis_ok is False:
            reasons.append(f"redis unreachable: {self.redis_error}")
        if view.version is None:
            reasons.append("no congestion map yet")
        elif view.stale:
            reasons.append(f"congestion map is stale ({view.age_s:.1f} s old); "
                           "using tier priors")
        return view.version is not None, reasons

    # -- background -----------------------------------------------------------------------
    def spawn(self, supervisor: Supervisor) -> None:
        """Start the feed's loops (Redis catch-up, MQTT announcements) under ``supervisor``,
        which owns them: a loop that dies is noticed there (readiness), not silently lost."""
        if self.redis_settings is not None:
            supervisor.spawn(self._redis_loop(self.redis_settings), name="map-redis")
        if self.mqtt_settings is not None:
            supervisor.spawn(reconnecting(self.mqtt_settings, self._mqtt_session,
                                          on_state=self._on_mqtt_state), name="map-mqtt")

    def _on_mqtt_state(self, up: bool) -> None:
        if up != self.mqtt_connected:
            log.info("mqtt connectivity", connected=up)
        self.mqtt_connected = up
        if up:  # a version may have been published while we were away
            self._wake.set()

    async def _mqtt_session(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topics.map_version, qos=1)
        async for message in messages(client):
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                payload = str(payload).encode()
            try:
                version = announced_version(bytes(payload))
            except ValueError as exc:
                self.rejected_total += 1
                log.warning("bad map announcement", error=str(exc))
                continue
            self.announced = max(self.announced or 0, version)
            if self.version is None or version > self.version:
                self._wake.set()

    async def _redis_loop(self, settings: RedisSettings) -> None:
        async with connect_redis(settings, retries=0) as redis:
            while True:
                self._wake.clear()
                try:
                    await self._catch_up(redis)
                except Exception as exc:  # a bad map must not end the feed
                    self.rejected_total += 1
                    log.error("map catch-up failed", error=repr(exc))
                # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation
                # that races with the event being set.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await self._wake.wait()

    async def _catch_up(self, redis: aioredis.Redis) -> None:
        """Read the version key and, if newer than the map held, the snapshot."""
        try:
            async with asyncio.timeout(self.redis_timeout_s):
                raw_version = await redis.get(self.keys.map_version)
                newest = int(raw_version) if raw_version is not None else None
                if newest is None and self.announced is None:
                    self._redis_state(True)
                    return
                if newest is not None and self.version is not None \
                        and newest <= self.version:
                    self._redis_state(True)
                    return
                data = await redis.get(self.keys.map_snapshot)
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self._redis_state(False, str(exc) or type(exc).__name__)
            return
        except ValueError:
            self._redis_state(True)
            self.rejected_total += 1
            log.warning("map version key is not an integer", key=self.keys.map_version)
            return
        self._redis_state(True)
        if data is None:
            return
        if isinstance(data, str):
            data = data.encode()
        try:
            header = snapshot_header(data)
            if self.version is not None and header.version <= self.version:
                return
            cmap = await asyncio.to_thread(decode_snapshot, self.topology, data)
        except SnapshotError as exc:
            self.rejected_total += 1
            log.warning("map snapshot rejected", error=str(exc))
            return
        self.fetched_total += 1
        self.install(cmap)

    def _redis_state(self, ok: bool, error: str | None = None) -> None:
        if ok != self.redis_ok:
            log.info("redis connectivity", ok=ok, error=error)
        self.redis_ok = ok
        self.redis_error = error
