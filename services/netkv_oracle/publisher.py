"""Leader election, versioned snapshots in Redis and version announcements on MQTT.

**Multiple oracles: leader election.** Oracles contend for ``RedisKeys.oracle_lock``
(``SET NX PX``, renewed every ttl/3 by a compare-and-expire script). Only the leader reads the
streams and publishes; it must see every sample to build a whole map, so splitting one
consumer group across oracles would give each a partial map. Followers stay hot: they load
each published snapshot and serve the HTTP cost API from it, and the one that wins the lock
next seeds its map from that snapshot and XAUTOCLAIMs what the old leader left pending.

**Publishing is fenced**: a Lua script allocates the next version only if the caller still
holds the lock (``INCR``, kept above the caller's last version so versions stay monotonic
even if Redis restarted empty), and a second script stores the snapshot only if the lock and
the version are unchanged. The lock, the version and the snapshot share the ``{map}`` hash
tag, so the scripts run on a Redis Cluster unchanged.

**Epochs**: every oracle process starts a new term id (:func:`~netkv.contracts.snapshot.
new_epoch`) and draws another each time it wins leadership; the snapshot envelope and the
announcement carry it as ``epoch``. Versions are monotonic within an epoch; a reader that sees
a new epoch accepts its map even at a lower version (an oracle restarted on an empty Redis
counts from 1 again).

**Announcement** (:mod:`netkv.contracts.announcement`, shared with the scheduler): JSON
``{"version", "created_ts", "snapshot_key", "oracle", "epoch"}`` on ``MqttTopics.map_version``,
retained, QoS 1: a scheduler that (re)connects gets the newest version at once and fetches
the snapshot from Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from netkv.adapters.mqtt_client import reconnecting
from netkv.config import MqttSettings
from netkv.contracts.announcement import Announcement
from netkv.contracts.names import MqttTopics, RedisKeys
from netkv.contracts.snapshot import (
    SnapshotError,
    decode_snapshot,
    encode_snapshot,
    new_epoch,
    snapshot_header,
)
from netkv.core.congestion import CongestionMap
from netkv.core.topology import Topology
from netkv_oracle.metrics import OracleMetrics

log = structlog.get_logger(__name__)

AnyRedis = Redis | RedisCluster

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_ALLOCATE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local v = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[2])
if v <= floor then
  v = floor + 1
  redis.call('SET', KEYS[2], v)
end
return v
"""
_STORE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(redis.call('GET', KEYS[2])) ~= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[3], ARGV[3])
return 1
"""


class Leadership:
    """Holds (or waits for) the oracle lock. ``is_leader`` turns False as soon as a renewal
    fails or the lease could have run out, whichever comes first."""

    def __init__(self, redis: AnyRedis, keys: RedisKeys, token: str, ttl_s: float,
                 metrics: OracleMetrics) -> None:
        self.redis = redis
        self.key = keys.oracle_lock
        self.token = token
        self.ttl_ms = int(ttl_s * 1000)
        self.metrics = metrics
        self._lease_until = 0.0
        self.changed = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        return time.monotonic() < self._lease_until

    async def step(self) -> bool:
        """Acquire or renew once; returns whether we lead."""
        was = self.is_leader
        started = time.monotonic()
        try:
            ok = await self.redis.eval(_RENEW, 1, self.key, self.token, self.ttl_ms)
            if not ok:
                ok = await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms)
        except (RedisError, OSError) as exc:
            self.metrics.redis_errors.labels("leader").inc()
            log.warning("leader lease check failed", error=str(exc))
            ok = False
        # Count the lease from before the request: never believe it lasts longer than Redis.
        self._lease_until = started + self.ttl_ms / 1000 * 0.9 if ok else 0.0
        self.metrics.leader.set(1 if ok else 0)
        if bool(ok) != was:
            log.info("leadership changed", leader=bool(ok), oracle=self.token)
            self.changed.set()
        return bool(ok)

    async def run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self.ttl_ms / 3000)

    async def release(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.eval(_RELEASE, 1, self.key, self.token)
        self._lease_until = 0.0
        self.metrics.leader.set(0)


class Announcer:
    """Keeps the newest announcement published (retained, QoS 1) across broker restarts."""

    def __init__(self, settings: MqttSettings, identifier: str,
                 metrics: OracleMetrics) -> None:
        self.settings = settings
        self.topic = MqttTopics(settings.prefix).map_version
        self.identifier = identifier
        self.metrics = metrics
        self.latest: Announcement | None = None
        self._wake = asyncio.Event()
        self.connected = False

    def announce(self, announcement: Announcement) -> None:
        self.latest = announcement
        self._wake.set()

    def _state(self, up: bool) -> None:
        self.connected = up

    async def _session(self, client: aiomqtt.Client) -> None:
        self._wake.set()  # a new connection republishes the newest version
        while True:
            await self._wake.wait()
            self._wake.clear()
            latest = self.latest
            if latest is None:
                continue
            await client.publish(self.topic, latest.encode(), qos=1, retain=True)
            self.metrics.mqtt_published.inc()

    async def run(self) -> None:
        await reconnecting(self.settings, self._session, identifier=self.identifier,
                           on_state=self._state)


class Publisher:
    """Snapshots the leader's map into Redis under fencing and hands versions to MQTT."""

    def __init__(self, redis: AnyRedis, keys: RedisKeys, leadership: Leadership, *,
                 announcer: Announcer | None, metrics: OracleMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = keys
        self.leadership = leadership
        self.announcer = announcer
        self.metrics = metrics
        self.clock = clock
        self.version = 0
        self.created_ts = 0.0
        self.epoch = new_epoch()

    def new_term(self) -> str:
        """A new leader term: a new epoch for everything published from now on."""
        self.epoch = new_epoch()
        return self.epoch

    async def publish(self, cmap: CongestionMap) -> int | None:
        """Write the next version; None if we are not (or no longer) the leader."""
        started = time.perf_counter()
        keys, token = self.keys, self.leadership.token
        version = int(await self.redis.eval(_ALLOCATE, 2, keys.oracle_lock, keys.map_version,
                                            token, self.version))
        if version < 0:
            return None
        created = self.clock()
        data = encode_snapshot(cmap, version, created, self.epoch)
        stored = await self.redis.eval(_STORE, 3, keys.oracle_lock, keys.map_version,
                                       keys.map_snapshot, token, version, data)
        if not stored:
            return None
        cmap.version, cmap.created_ts, cmap.epoch = version, created, self.epoch
        self.version, self.created_ts = version, created
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        self.metrics.map_version.set(version)
        self.metrics.map_created.set(created)
        if self.announcer is not None:
            self.announcer.announce(Announcement(version, created, keys.map_snapshot, token,
                                                 self.epoch))
        return version


async def load_snapshot(redis: AnyRedis, keys: RedisKeys, topology: Topology, *,
                        newer_than: int = -1, epoch: str | None = None,
                        clock: Callable[[], float] = time.time) -> CongestionMap | None:
    """The published map if its version is above ``newer_than``, or (given the ``epoch`` of
    the map held) if it comes from another epoch at a different version: an oracle that
    restarted on an empty Redis. Decoded in a worker thread (a large map takes milliseconds
    that the event loop should spend on I/O)."""
    raw: Any = await redis.get(keys.map_version)
    if raw is None or int(raw) == newer_than or (int(raw) < newer_than and epoch is None):
        return None
    data = await redis.get(keys.map_snapshot)
    if not isinstance(data, bytes):
        return None
    try:
        header = snapshot_header(data)
        if header.version <= newer_than and header.epoch == epoch:
            return None
        if header.version <= newer_than and epoch is None:
            return None
        return await asyncio.to_thread(decode_snapshot, topology, data, clock)
    except SnapshotError as exc:
        log.warning("published snapshot unreadable", error=str(exc))
        return None
