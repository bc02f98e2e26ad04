"""Reads the agents' sample streams through a consumer group and feeds the map builder.

* **Discovery**: every ``discover_interval_s`` the ingestor SCANs for
  ``<prefix>{s*}:samples:*`` (on a cluster, every primary) and reads the per-agent registry keys for
  agents' NIC names; a new stream gets the consumer group (``XGROUP CREATE ... 0``).
* **Reading**: one task per shard runs ``XREADGROUP GROUP netkv-oracle <oracle> BLOCK ...
  STREAMS <every stream of the shard> >``; the streams of a shard share a hash tag, so this is
  one command on a Redis Cluster too.
* **Decoding** is strict (:func:`netkv.contracts.wire.decode_batch`), then the identity check
  (:class:`~netkv_oracle.identity.Ownership`); a bad entry is rejected whole, counted in
  ``netkv_samples_rejected_total{reason}``, acknowledged and skipped. Nothing an agent sends
  can end the loop; Redis errors are counted and retried with backoff.
* **Bounding**: a rejected entry is deleted (``XDEL``) as it is acknowledged, so a hostile or
  broken writer's entries do not stay in Redis; and every discovery round trims each stream
  to :data:`STREAM_CAP` entries (``XTRIM MAXLEN ~``), which bounds a stream whose writer
  ignores the ``MAXLEN`` the agents use on write.
* **Acknowledging**: entries are ``XACK``-ed after they are applied. Pending entries of a
  consumer that died (idle longer than ``claim_idle_s``) are taken over with ``XAUTOCLAIM``.
* A stream or group that vanished (Redis restarted without persistence) shows up as
  ``NOGROUP``; the shard forgets its streams and discovery recreates them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from netkv.contracts.names import RedisKeys, shard_of
from netkv.contracts.registration import read_registry
from netkv.contracts.samples import Sample
from netkv.contracts.wire import WireError, decode_batch
from netkv_oracle.builder import MapBuilder
from netkv_oracle.identity import (
    Binding,
    Ownership,
    RejectedError,
    binding_from_registration,
    stream_owner,
)
from netkv_oracle.metrics import OracleMetrics

log = structlog.get_logger(__name__)

AnyRedis = Redis | RedisCluster
STREAM_CAP = 10_000  # entries per stream the oracle keeps at most (agents write MAXLEN ~1000)


class Ingestor:
    """Consumes every agent stream into one :class:`MapBuilder`."""

    def __init__(self, redis: AnyRedis, keys: RedisKeys, consumer: str, builder: MapBuilder,
                 *, ownership: Ownership, metrics: OracleMetrics, read_count: int = 512,
                 block_ms: int = 100, claim_idle_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = keys
        self.group = keys.consumer_group
        self.consumer = consumer
        self.builder = builder
        self.ownership = ownership
        self.metrics = metrics
        self.read_count = read_count
        self.block_ms = block_ms
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.clock = clock
        self.shards: dict[int, set[str]] = {s: set() for s in range(keys.shards)}
        self._shard_ready = {s: asyncio.Event() for s in range(keys.shards)}
        self.rediscover = asyncio.Event()
        self.last_progress = 0.0  # monotonic time of the last successful Redis round
        self._refused: dict[str, bytes] = {}
        self._rejected: dict[str, list[Any]] = {}  # stream -> ids to XDEL with the next ack
        self._ingested: dict[type[Sample], Any] = {}  # sample class -> its metric child
        self._owners: dict[str, str | None] = {}  # stream -> its agent (stream_owner)

    # -- discovery ------------------------------------------------------------------------
    async def discover(self) -> int:
        """Find sample streams and make sure each has our group. Returns how many are new."""
        found: set[str] = set()
        pattern = f"{self.keys.prefix}{{s*}}:samples:*"
        async for raw in self.redis.scan_iter(match=pattern, count=1000, _type="stream"):
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if stream_owner(self.keys, name) is not None:
                found.add(name)
        await self._read_registry()
        new = 0
        for stream in sorted(found):
            owner = stream_owner(self.keys, stream)
            assert owner is not None
            shard = shard_of(owner, self.keys.shards)
            if stream in self.shards[shard]:
                continue
            try:
                await self.redis.xgroup_create(stream, self.group, id="0")
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    log.warning("cannot create group", stream=stream, error=str(exc))
                    continue
            self.shards[shard].add(stream)
            self._shard_ready[shard].set()
            new += 1
        self.metrics.streams.set(sum(len(s) for s in self.shards.values()))
        self.last_progress = time.monotonic()
        return new

    async def _read_registry(self) -> None:
        """Agents' bindings (interface -> links), each validated against the topology."""
        entries = await read_registry(self.redis, self.keys)
        bindings: dict[str, Binding] = {}
        refused: dict[str, bytes] = {}
        for name, raw in entries.items():
            previous = self.ownership.bindings.get(name)
            try:
                bindings[name] = binding_from_registration(self.ownership.topology, name, raw)
            except RejectedError as exc:
                refused[name] = raw
                if self._refused.get(name) != raw:  # count each bad entry once
                    self.metrics.samples_rejected.labels(exc.reason).inc()
                    log.warning("registry entry refused", agent=name, error=str(exc))
                if previous is not None:
                    bindings[name] = previous
        self._refused = refused
        self.ownership.bindings = bindings

    # -- entries --------------------------------------------------------------------------
    def _owner(self, stream: str) -> str | None:
        """:func:`stream_owner`, remembered per stream name (the same few, every round)."""
        try:
            return self._owners[stream]
        except KeyError:
            if len(self._owners) >= 65536:
                self._owners.clear()
            owner = self._owners[stream] = stream_owner(self.keys, stream)
            return owner

    def handle(self, stream: str, fields: dict[Any, Any], now: float) -> bool:
        """Decode, check and apply one stream entry. Returns False if it was rejected."""
        tally: Counter[type[Sample] | None] = Counter()
        accepted = self._entry(stream, self._owner(stream), fields, now, tally)
        self._count(tally)
        return accepted

    def _entry(self, stream: str, owner: str | None, fields: dict[Any, Any], now: float,
               tally: Counter[type[Sample] | None]) -> bool:
        """:meth:`handle` without the metric updates of accepted entries: those are added to
        ``tally`` (samples by type; batches under ``None``) for :meth:`_count` to apply once
        per round. Rejections are counted at once."""
        try:
            if owner is None:
                raise RejectedError("bad_stream", "stream", f"{stream!r} is not a sample stream")
            if len(fields) != 1:
                raise RejectedError("bad_entry", "entry", f"expected one field, got {len(fields)}")
            data = next(iter(fields.values()))
            if not isinstance(data, bytes):
                raise RejectedError("bad_entry", "entry", "payload is not bytes")
            batch = decode_batch(data)
            self.ownership.check(batch, owner)
        except (WireError, RejectedError) as exc:
            self.metrics.samples_rejected.labels(exc.reason).inc()
            log.debug("rejected entry", stream=stream, reason=exc.reason, error=str(exc))
            return False
        self.builder.apply(batch.agent, batch.samples, now, self.ownership)
        tally[None] += 1
        tally.update(map(type, batch.samples))  # counted in C (Counter over map)
        return True

    def _count(self, tally: Counter[type[Sample] | None]) -> None:
        """Apply a round's tally to the metrics: one increment per kind, not per batch (each
        kind's metric child is looked up once)."""
        for cls, n in tally.items():
            if cls is None:
                self.metrics.batches.inc(n)
                continue
            child = self._ingested.get(cls)
            if child is None:
                child = self._ingested[cls] = self.metrics.samples_ingested.labels(cls.kind)
            child.inc(n)

    def _handle_all(self, stream: str, entries: list[Any]) -> list[Any]:
        now = self.clock()
        owner = self._owner(stream)
        tally: Counter[type[Sample] | None] = Counter()
        ids = []
        for entry_id, fields in entries:
            ids.append(entry_id)
            if fields is None:  # deleted while pending (trimmed): nothing to apply
                continue
            if not self._entry(stream, owner, fields, now, tally):
                self._rejected.setdefault(stream, []).append(entry_id)
        self._count(tally)
        return ids

    async def _ack(self, acks: dict[str, list[Any]]) -> None:
        """Acknowledge handled entries and delete the rejected ones."""
        rejected, self._rejected = self._rejected, {}
        if not acks and not rejected:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in acks.items():
                pipe.xack(stream, self.group, *ids)
            for stream, ids in rejected.items():
                pipe.xdel(stream, *ids)
            await pipe.execute()
        if rejected:
            self.metrics.trimmed.inc(sum(len(ids) for ids in rejected.values()))

    async def trim(self) -> None:
        """Cap every known stream at :data:`STREAM_CAP` entries (approximate, cheap)."""
        streams = [s for shard in self.shards.values() for s in shard]
        if not streams:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xtrim(stream, maxlen=STREAM_CAP, approximate=True)
            await pipe.execute()

    async def read_shard(self, shard: int) -> int:
        """One XREADGROUP round over a shard. Returns the number of entries handled."""
        streams = self.shards[shard]
        if not streams:
            self._shard_ready[shard].clear()
            return 0
        try:
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, dict.fromkeys(sorted(streams), ">"),
                count=self.read_count, block=self.block_ms)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                log.warning("streams or group vanished; rediscovering", shard=shard)
                streams.clear()
                self.rediscover.set()
                return 0
            raise
        self.last_progress = time.monotonic()
        if not reply:
            return 0
        acks: dict[str, list[Any]] = {}
        handled = 0
        items = reply.items() if isinstance(reply, dict) else reply
        for raw_stream, entries in items:
            stream = raw_stream.decode() if isinstance(raw_stream, bytes) else str(raw_stream)
            acks[stream] = self._handle_all(stream, entries)
            handled += len(entries)
        await self._ack(acks)
        return handled

    async def claim(self) -> int:
        """Take over entries another consumer left pending for longer than claim_idle_s."""
        claimed = 0
        for streams in self.shards.values():
            for stream in sorted(streams):
                start = "0-0"
                for _ in range(100):  # bounded
                    reply = await self.redis.xautoclaim(
                        stream, self.group, self.consumer, self.claim_idle_ms,
                        start_id=start, count=self.read_count)
                    start, entries = reply[0], reply[1]
                    if entries:
                        ids = self._handle_all(stream, entries)
                        await self._ack({stream: ids})
                        claimed += len(entries)
                    if start in (b"0-0", "0-0"):
                        break
        if claimed:
            self.metrics.claimed.inc(claimed)
            log.info("claimed pending entries", count=claimed)
        return claimed

    # -- loops ----------------------------------------------------------------------------
    async def shard_loop(self, shard: int, active: Callable[[], bool]) -> None:
        """Read one shard forever while ``active()``; errors are counted, never fatal."""
        backoff = 0.05
        while True:
            if not active():
                await asyncio.sleep(0.1)
                continue
            if not self.shards[shard]:
                ready = self._shard_ready[shard]
                # Cleared here, with no await since the check above: discovery sets it again
                # when it adds a stream. (Left set, Event.wait() would return at once, without
                # yielding, and this loop would spin and starve the event loop: wait_for
                # used to hide that by always yielding once.)
                ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await ready.wait()
                continue
            try:
                await self.read_shard(shard)
                backoff = 0.05
            except (RedisError, OSError) as exc:
                self.metrics.redis_errors.labels("xreadgroup").inc()
                log.warning("read failed", shard=shard, error=str(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def housekeeping_loop(self, active: Callable[[], bool], discover_s: float,
                                claim_s: float) -> None:
        """Discovery and claiming, on their own timers."""
        next_claim = time.monotonic() + claim_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(discover_s):
                    await self.rediscover.wait()
            self.rediscover.clear()
            if not active():
                continue
            try:
                await self.discover()
                await self.trim()
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + claim_s
                    await self.claim()
            except (RedisError, OSError) as exc:
                self.metrics.redis_errors.labels("discover").inc()
                log.warning("discovery failed", error=str(exc))
