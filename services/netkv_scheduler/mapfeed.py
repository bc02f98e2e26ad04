"""The latest congestion map, kept in memory and never waited for by a decision.

Versions are pushed over MQTT (the retained ``map/version`` announcement); the snapshot itself
is read from Redis at start, on every announcement newer than the map held, and by a slow
poll of the version key, which also catches versions announced while the broker was away.
Snapshots are decoded off the event loop. Decisions read :meth:`MapFeed.view`, a plain
attribute read: if the map is missing or older than ``stale_s`` they use the tier priors and
say so; broker and Redis trouble only shows up as ``degraded`` in ``/readyz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import msgpack
import numpy as np
import redis.asyncio as aioredis
import structlog

from netkv.adapters.mqtt_client import messages, reconnecting
from netkv.adapters.redis_client import connect_redis
from netkv.config import MqttSettings, RedisSettings
from netkv.core.congestion import CongestionMap, PairState, SnapshotError, snapshot_header
from netkv.core.oracle import CostEstimate, CostOracle, LinkStateOracle, static_tier_oracle
from netkv.core.topology import FloatArray, IntArray, Topology
from netkv.telemetry.names import MqttTopics, RedisKeys

log = structlog.get_logger(__name__)


class PathTables:
    """Per-host prefix reductions of a link view, so one source's row costs O(hosts) numpy.

    A path is the source's first ``tier`` up links then the destination's first ``tier`` down
    links (or the host fabric alone at tier 0), so its bottleneck bandwidth, summed latency,
    oldest age and lowest confidence are reductions of two per-host prefixes. This is
    ``LinkStateOracle.estimate`` without building an (n, 6) path matrix per call.
    """

    def __init__(self, view: LinkStateOracle,
                 tier_rows: dict[int, IntArray] | None = None) -> None:
        topo = view.topology
        self.topology = topo
        self.tier_rows = {} if tier_rows is None else tier_rows  # static: shared across views
        self.all_hosts: IntArray = np.arange(topo.n_hosts, dtype=np.int64)
        up, down, fab = topo.up_chain, topo.down_chain, topo.fabric_link
        bw, lat = view.available_bytes_s, view.latency_s
        age, conf = view.age_s, view.confidence
        self.up_bw = np.minimum.accumulate(bw[up], axis=1)
        self.down_bw = np.minimum.accumulate(bw[down], axis=1)
        self.up_lat = np.cumsum(lat[up], axis=1)
        self.down_lat = np.cumsum(lat[down], axis=1)
        self.up_age = np.maximum.accumulate(age[up], axis=1)
        self.down_age = np.maximum.accumulate(age[down], axis=1)
        self.up_conf = np.minimum.accumulate(conf[up], axis=1)
        self.down_conf = np.minimum.accumulate(conf[down], axis=1)
        self.fab_bw, self.fab_lat = bw[fab], lat[fab]
        self.fab_age, self.fab_conf = age[fab], conf[fab]

    def row(self, src: int) -> CostEstimate:
        """Zero-byte estimate from ``src`` to every host."""
        tier = self.tier_rows.get(src)
        if tier is None:
            tier = self.tier_rows[src] = self.topology.tiers(src, self.all_hosts)
        k = np.maximum(tier - 1, 0)
        hosts = self.all_hosts
        same = tier == 0
        bandwidth = np.minimum(self.up_bw[src, k], self.down_bw[hosts, k])
        latency = self.up_lat[src, k] + self.down_lat[hosts, k]
        age = np.maximum(self.up_age[src, k], self.down_age[hosts, k])
        conf = np.minimum(self.up_conf[src, k], self.down_conf[hosts, k])
        bandwidth[same] = self.fab_bw[src]
        latency[same] = self.fab_lat[src]
        age[same] = self.fab_age[src]
        conf[same] = self.fab_conf[src]
        bandwidth = np.maximum(bandwidth, 1.0)  # as LinkStateOracle: a dead link is slow
        return CostEstimate(latency.copy(), latency, bandwidth, tier, age, conf)


class CachedOracle:
    """Per-source rows of a fixed oracle (the tier prior), computed once each.

    Every oracle in NetKV predicts ``latency + bytes / bandwidth``, so a row computed with
    zero bytes answers any byte count exactly, in O(|D|) numpy per decision.
    """

    def __init__(self, base: LinkStateOracle) -> None:
        self.base = base
        self.available_bytes_s = base.available_bytes_s  # per-link view, for bookings
        self.tables = PathTables(base)
        self._rows: dict[int, CostEstimate] = {}

    def row(self, src: int) -> CostEstimate:
        hit = self._rows.get(src)
        if hit is None:
            hit = self._rows[src] = self.tables.row(src)
        return hit

    def estimate(self, src: int, dsts: IntArray, nbytes: FloatArray | float) -> CostEstimate:
        return _pick(self.row(src), dsts, nbytes)


def _pick(row: CostEstimate, dsts: IntArray, nbytes: FloatArray | float) -> CostEstimate:
    latency = row.latency_s[dsts]
    bandwidth = row.bandwidth_bytes_s[dsts]
    seconds = latency + np.asarray(nbytes, dtype=np.float64) / bandwidth
    return CostEstimate(seconds, latency, bandwidth, row.tier[dsts], row.age_s[dsts],
                        row.confidence[dsts])


class MapOracle:
    """The congestion map's estimate (``CongestionMap.estimate``), shaped for the hot path.

    ``CongestionMap.estimate`` walks the destinations in Python to apply per-pair RTT and
    loss; at |D| = 1,024 that is about a millisecond per decision. Here the link view is
    recomputed at most every ``ttl_s``, per-source rows are cached within it, and pair
    corrections touch only the pairs probed from that source (indexed once per map). The
    formula is the map's own; ``tests/unit/test_scheduler_units.py`` checks they agree.
    """

    def __init__(self, cmap: CongestionMap, ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.cmap = cmap
        self.ttl_s = ttl_s
        self.clock = clock
        self.all_hosts: IntArray = np.arange(cmap.topology.n_hosts, dtype=np.int64)
        self._pairs: dict[int, list[tuple[int, PairState]]] = {}
        for (a, b), pair in cmap.pairs.items():
            if a != b:
                self._pairs.setdefault(a, []).append((b, pair))
                self._pairs.setdefault(b, []).append((a, pair))
        self._view_at = -math.inf
        self._view: LinkStateOracle | None = None
        self._tables: PathTables | None = None
        self._tier_rows: dict[int, IntArray] = {}
        self._rows: dict[int, CostEstimate] = {}

    def _fresh_view(self) -> tuple[LinkStateOracle, float]:
        now = self.clock()
        if self._view is None or now - self._view_at > self.ttl_s:
            self._view = self.cmap.link_view(now)
            self._tables = PathTables(self._view, self._tier_rows)
            self._view_at = now
            self._rows.clear()
        return self._view, self._view_at

    @property
    def available_bytes_s(self) -> FloatArray:
        return self._fresh_view()[0].available_bytes_s

    def row(self, src: int) -> CostEstimate:
        _, now = self._fresh_view()
        hit = self._rows.get(src)
        if hit is not None:
            return hit
        assert self._tables is not None
        base = self._tables.row(src)
        latency = base.latency_s.copy()
        loss = np.zeros(latency.shape[0])
        params = self.cmap.params
        pairs = self._pairs.get(src, ())
        if pairs:
            dsts = np.array([d for d, _ in pairs], dtype=np.int64)
            ts = np.array([p.ts for _, p in pairs])
            weight = params.freshness(now - ts)
            srtt = np.array([p.srtt_s for _, p in pairs])
            ploss = np.minimum(np.array([p.loss for _, p in pairs]), params.max_loss)
            live = weight > 0
            dsts, weight, srtt, ploss = dsts[live], weight[live], srtt[live], ploss[live]
            latency[dsts] = weight * srtt / 2 + (1 - weight) * latency[dsts]
            loss[dsts] = weight * ploss
        bandwidth = base.bandwidth_bytes_s * (1.0 - loss)
        hit = self._rows[src] = CostEstimate(latency, latency, bandwidth, base.tier,
                                             base.age_s, base.confidence)
        return hit

    def estimate(self, src: int, dsts: IntArray, nbytes: FloatArray | float) -> CostEstimate:
        return _pick(self.row(src), dsts, nbytes)


@dataclass(frozen=True, slots=True)
class MapView:
    """What one decision uses: the oracle and where it came from."""

    oracle: CostOracle
    version: int | None  # None: no map held
    age_s: float | None
    stale: bool  # True: tier priors are in use (no map, or too old)


def parse_announcement(payload: bytes) -> int:
    """A map version from an MQTT announcement: JSON or msgpack ``{"version": n}``, or a bare
    integer. Raises ValueError on anything else."""
    data: Any
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        try:
            data = msgpack.unpackb(payload, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ValueError(f"not JSON or msgpack: {exc}") from None
    if isinstance(data, dict):
        data = data.get("version")
    if isinstance(data, bool) or not isinstance(data, int) or data < 0:
        raise ValueError(f"no non-negative integer version in {payload[:80]!r}")
    return data


class MapFeed:
    """Owns the map consumer tasks; :meth:`run` is the one long-lived coroutine."""

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
        self.keys = RedisKeys(redis.prefix if redis else "netkv:")
        self.topics = MqttTopics(mqtt.prefix if mqtt else "netkv/v1/")
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
        self._oracle = MapOracle(cmap, self.cache_s, self.clock)
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
    async def run(self) -> None:
        """Consume the map until cancelled (owned by the app's cleanup context)."""
        async with asyncio.TaskGroup() as tg:
            if self.redis_settings is not None:
                tg.create_task(self._redis_loop(self.redis_settings))
            if self.mqtt_settings is not None:
                tg.create_task(reconnecting(self.mqtt_settings, self._mqtt_session,
                                            on_state=self._on_mqtt_state))

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
                version = parse_announcement(bytes(payload))
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)

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
            if self.version is not None and header["version"] <= self.version:
                return
            cmap = await asyncio.to_thread(CongestionMap.from_snapshot, self.topology, data)
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
