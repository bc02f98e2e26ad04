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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

import aiomqtt
import msgpack
import msgspec
import numpy as np
import redis.asyncio as aioredis
import structlog

from netkv.adapters.mqtt_client import messages, reconnecting
from netkv.adapters.redis_client import connect_redis
from netkv.config import MqttSettings, RedisSettings
from netkv.contracts.names import MqttTopics, RedisKeys
from netkv.contracts.snapshot import SnapshotError, decode_snapshot, snapshot_header
from netkv.core.congestion import CongestionMap
from netkv.core.costmodel import CostOracle, static_tier_oracle
from netkv.core.paths import CachedOracle
from netkv.core.topology import Topology
from netkv.http.ratelimit import RateLimitedLog
from netkv.supervisor import Supervisor

log = structlog.get_logger(__name__)
_errors = RateLimitedLog(__name__)  # a flood of bad messages costs a few lines


MAX_ANNOUNCEMENT_BYTES = 4096
MAX_ANNOUNCEMENT_NESTING = 16


class AnnouncementError(ValueError):
    """A map-version message that is not one; ``reason`` is a short, bounded category."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Announced(msgspec.Struct):
    """The two fields a reader needs (others, e.g. snapshot_key or oracle, are ignored)."""

    version: Annotated[int, msgspec.Meta(ge=0)]
    epoch: Annotated[str, msgspec.Meta(max_length=128)] | None = None


_ANNOUNCED = msgspec.json.Decoder(_Announced | int)


def parse_announcement(payload: bytes) -> tuple[int, str | None]:
    """(version, epoch) from a map-version message: JSON or msgpack ``{"version": n, "epoch":
    "..."}`` (other fields ignored) or a bare integer. Bounded: at most 4 KiB and 16 levels
    of nesting are looked at, so no payload can recurse the parser; raises
    :class:`AnnouncementError`."""
    if len(payload) > MAX_ANNOUNCEMENT_BYTES:
        raise AnnouncementError("too large")
    if payload.count(b"[") + payload.count(b"{") > MAX_ANNOUNCEMENT_NESTING:
        raise AnnouncementError("too deeply nested")
    try:
        got = _ANNOUNCED.decode(payload)
    except msgspec.ValidationError:
        raise AnnouncementError("no non-negative integer version") from None
    except msgspec.DecodeError:
        try:
            data = msgpack.unpackb(payload, raw=False, max_array_len=16, max_map_len=16,
                                   max_str_len=256, max_bin_len=256)
        except Exception:
            raise AnnouncementError("not JSON or msgpack") from None
        try:
            got = msgspec.convert(data, _Announced | int)
        except msgspec.ValidationError:
            raise AnnouncementError("no non-negative integer version") from None
    if isinstance(got, int):
        if isinstance(got, bool) or got < 0:
            raise AnnouncementError("no non-negative integer version")
        return got, None
    return got.version, got.epoch


@dataclass(slots=True)
class MapView:
    """What one decision uses: the oracle and where it came from (one per decision, never
    changed once made; not frozen because a frozen init costs a microsecond per call)."""

    oracle: CostOracle
    version: int | None  # None: no map held
    age_s: float | None
    stale: bool  # True: tier priors are in use (no map, or too old)


class MapFeed:
    """The map a router decides with; :meth:`spawn` starts its consumer loops."""

    def __init__(self, topology: Topology, redis: RedisSettings | None,
                 mqtt: MqttSettings | None, *, stale_s: float = 10.0, poll_s: float = 2.0,
                 redis_timeout_s: float = 1.0, cache_s: float = 0.1, silent_s: float = 10.0,
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
        self.errors_by_reason: dict[str, int] = {}
        self.loop_failures: dict[str, tuple[float, str]] = {}
        self.fetched_total = 0
        self.announced: int | None = None
        self.announced_epoch: str | None = None
        self.epoch: str | None = None
        self.silent_s = silent_s
        self._seen_hosts: set[int] = set()
        self._rejected_version: int | None = None
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

    def newer(self, version: int, created_ts: float, epoch: str | None = None) -> bool:
        """Is a map with this envelope newer than the one held?

        A higher version is; so is one from another oracle epoch (a restart, a failover, an
        empty Redis: the version counter starts again); so is a lower or equal version made
        later than the map held (a restarted counter from an oracle that says no epoch).
        """
        if self.version is None or self.created_ts is None:
            return True
        if epoch is not None and self.epoch is not None and epoch != self.epoch:
            return True
        if version > self.version:
            return True
        return created_ts > self.created_ts and version != self.version

    def install(self, cmap: CongestionMap, epoch: str | None = None) -> bool:
        """Adopt ``cmap`` if it is newer than the map held (see :meth:`newer`)."""
        epoch = epoch if epoch is not None else getattr(cmap, "epoch", None)
        if not self.newer(cmap.version, cmap.created_ts, epoch):
            return False
        if self.version is not None and cmap.version < self.version:
            log.info("map version went back: a new oracle epoch", held=self.version,
                     version=cmap.version, epoch=epoch)
        self.epoch = epoch
        self._seen_hosts |= set(np.flatnonzero(cmap.host_seen_ts > 0).tolist())
        self.map = cmap
        self._oracle = cmap.cached(self.cache_s, self.clock)
        self.version = cmap.version
        self.created_ts = cmap.created_ts
        # debug: one line per version is ~100 MB of log a day at info (issue 9)
        log.debug("map installed", version=cmap.version)
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
        silent = self.silent_agents()
        if silent:
            reasons.append(f"agents silent (reported before, not in the last "
                           f"{self.silent_s:g} s of the map): {', '.join(silent)}")
        now = self.clock()
        for loop, (when, why) in sorted(self.loop_failures.items()):  # recent ones
            if now - when < self.silent_s:
                reasons.append(f"map feed loop {loop} failed {now - when:.1f} s ago ({why}); "
                               "restarting")
        return view.version is not None, reasons

    def loop_failures_recent(self) -> bool:
        now = self.clock()
        return any(now - when < self.silent_s for when, _ in self.loop_failures.values())

    def silent_agents(self) -> list[str]:
        """Agents (hosts) the oracle heard from before and not within ``silent_s`` of the
        map's creation: a killed agent shows by name instead of fading into priors."""
        cmap = self.map
        if cmap is None:
            return []
        agents = getattr(cmap, "agents", None)  # {agent_id: last_seen_ts} when A's map has it
        if isinstance(agents, dict) and agents:
            return sorted(a for a, ts in agents.items() if cmap.created_ts - ts > self.silent_s)
        seen = cmap.host_seen_ts
        hosts = self.topology.hosts
        return [hosts[i].name for i in sorted(self._seen_hosts)
                if cmap.created_ts - float(seen[i]) > self.silent_s]

    # -- background -----------------------------------------------------------------------
    def spawn(self, supervisor: Supervisor) -> None:
        """Start the feed's loops (Redis catch-up, MQTT announcements) under ``supervisor``,
        which owns them. Each loop restarts itself after any exception (counted by reason,
        shown in :meth:`health` for ``silent_s``): a poisoned message cannot end the feed."""
        redis, mqtt = self.redis_settings, self.mqtt_settings
        if redis is not None:
            supervisor.spawn(self._forever("redis", lambda: self._redis_loop(redis)),
                             name="map-redis")
        if mqtt is not None:
            supervisor.spawn(self._forever("mqtt", lambda: reconnecting(
                mqtt, self._mqtt_session, on_state=self._on_mqtt_state)), name="map-mqtt")

    def count(self, reason: str) -> None:
        self.rejected_total += 1
        self.errors_by_reason[reason] = self.errors_by_reason.get(reason, 0) + 1

    async def _forever(self, name: str,
                       loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        backoff = 0.1
        while True:
            try:
                await loop()
                why = "returned"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = type(exc).__name__
            self.count(f"loop {name}: {why}")
            self.loop_failures[name] = (self.clock(), why)
            _errors.error("map feed loop failed; restarting", loop=name, reason=why,
                          retry_in_s=backoff)
            if name == "mqtt":
                self.mqtt_connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _on_mqtt_state(self, up: bool) -> None:
        if up != self.mqtt_connected:
            log.info("mqtt connectivity", connected=up)
        self.mqtt_connected = up
        if up:  # a version may have been published while we were away
            self._wake.set()

    async def _mqtt_session(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topics.map_version, qos=1)
        async for message in messages(client):
            try:
                payload = message.payload
                if not isinstance(payload, bytes | bytearray):
                    payload = str(payload).encode()[:MAX_ANNOUNCEMENT_BYTES + 1]
                version, epoch = parse_announcement(bytes(payload))
            except AnnouncementError as exc:
                self.count(f"announcement: {exc.reason}")
                _errors.warning("bad map announcement", reason=exc.reason)
                continue
            except Exception as exc:
                self.count(f"announcement: {type(exc).__name__}")
                _errors.warning("bad map announcement", reason=type(exc).__name__)
                continue
            self.announced = version
            self.announced_epoch = epoch
            if self.version is None or version != self.version or (
                    epoch is not None and epoch != self.epoch):
                self._wake.set()

    async def _redis_loop(self, settings: RedisSettings) -> None:
        async with connect_redis(settings, retries=0) as redis:
            while True:
                self._wake.clear()
                try:
                    await self._catch_up(redis)
                except Exception as exc:  # a bad map must not end the feed
                    self.count(f"catch-up: {type(exc).__name__}")
                    _errors.error("map catch-up failed", error=repr(exc)[:200])
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
                        and newest == self.version and self.announced_epoch in (
                            None, self.epoch):
                    self._redis_state(True)
                    return
                if newest is not None and newest == self._rejected_version:
                    self._redis_state(True)  # that one was not newer: do not refetch
                    return
                data = await redis.get(self.keys.map_snapshot)
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self._redis_state(False, str(exc) or type(exc).__name__)
            return
        except ValueError:
            self._redis_state(True)
            self.count("version key: not an integer")
            _errors.warning("map version key is not an integer", key=self.keys.map_version)
            return
        self._redis_state(True)
        if data is None:
            return
        if isinstance(data, str):
            data = data.encode()
        try:
            header = await asyncio.to_thread(snapshot_header, data)
            epoch = header.epoch
            if not self.newer(header.version, header.created_ts, epoch):
                self._rejected_version = header.version
                return
            cmap = await asyncio.to_thread(decode_snapshot, self.topology, data)
        except SnapshotError as exc:
            self.count(f"snapshot: {exc.where or 'envelope'}")
            _errors.warning("map snapshot rejected", error=str(exc)[:200])
            return
        self._rejected_version = None
        self.fetched_total += 1
        self.install(cmap, epoch if isinstance(epoch, str) else None)

    def _redis_state(self, ok: bool, error: str | None = None) -> None:
        if ok != self.redis_ok:
            log.info("redis connectivity", ok=ok, error=error)
        self.redis_ok = ok
        self.redis_error = error
