"""Getting samples to Redis, and staying alive when Redis is not there.

Samples handed to :meth:`Publisher.submit` are sealed every ``publish_interval_s`` into
batches (``netkv.contracts.wire.encode_batch``, at most ``max_batch_samples`` each) and
appended to the agent's stream ``RedisKeys.samples_stream(agent)`` as one entry with a single
field ``batch`` (:data:`STREAM_FIELD`) holding the msgpack bytes, with
``XADD ... MAXLEN ~ stream_maxlen`` so a stream nobody reads stays bounded.

Every ``heartbeat_interval_s`` the same pipeline also refreshes the heartbeat key
(``SET <heartbeat> <unix time> EX heartbeat_ttl_s``) and re-writes the agent's own registry
key (``SET <registration> <msgpack> EX 3 x heartbeat_ttl_s``: it outlives a short stall and
leaves the registry within seconds once the agent is gone), so a Redis that restarted empty is
repopulated within one heartbeat.

When Redis is down, probing goes on (the publisher is a separate task and never blocks the
probes): sealed batches wait in a bounded buffer of ``max_buffered_batches``; when it is full
the oldest batch is dropped and counted (``dropped_batches``, ``dropped_samples``). Reconnection
is attempted with capped exponential backoff; once Redis is back the buffer drains oldest
first in one pipeline per round. Every Redis call is bounded by ``redis_op_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from netkv.contracts.names import RedisKeys
from netkv.contracts.registration import Registration, encode_registration
from netkv.contracts.samples import Sample
from netkv.contracts.wire import Batch, encode_batch

log = structlog.get_logger(__name__)

STREAM_FIELD = "batch"
REGISTRATION_TTL_FACTOR = 3  # registry entry TTL, in heartbeat TTLs (a choice, see above)


@dataclass(slots=True)
class PublisherStats:
    batches_published: int = 0
    samples_published: int = 0
    dropped_batches: int = 0
    dropped_samples: int = 0
    publish_errors: int = 0
    heartbeats: int = 0
    reconnects: int = 0
    connected: bool = False


class Publisher:
    """Owns the sample buffer and the Redis writes of one agent."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys, agent: str, *,
                 registration: Callable[[], Registration],
                 publish_interval_s: float = 0.25, heartbeat_interval_s: float = 1.0,
                 heartbeat_ttl_s: int = 5, stream_maxlen: int = 1000,
                 max_buffered_batches: int = 240, max_batch_samples: int = 1024,
                 op_timeout_s: float = 2.0, max_backoff_s: float = 5.0) -> None:
        self.redis = redis
        self.keys = keys
        self.agent = agent
        self.stream = keys.samples_stream(agent)
        self.registration = registration
        self.publish_interval_s = publish_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.stream_maxlen = stream_maxlen
        self.max_buffered = max_buffered_batches
        self.max_batch_samples = max_batch_samples
        self.op_timeout_s = op_timeout_s
        self.max_backoff_s = max_backoff_s
        self.stats = PublisherStats()
        self._pending: list[Sample] = []
        self._buffer: deque[tuple[bytes, int]] = deque()  # (encoded batch, sample count)
        self._seq = 0
        self._encoded: tuple[Registration, bytes] | None = None
        self._next_heartbeat = 0.0
        self._backoff = 0.0
        self._retry_at = 0.0

    @property
    def buffered_batches(self) -> int:
        return len(self._buffer)

    def submit(self, samples: Sequence[Sample]) -> None:
        """Queue samples for the next batch (never blocks, never fails)."""
        self._pending.extend(samples)

    def seal(self, wall: float | None = None) -> None:
        """Turn pending samples into encoded batches in the bounded buffer."""
        wall = time.time() if wall is None else wall
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.max_batch_samples):
            chunk = tuple(pending[start:start + self.max_batch_samples])
            self._seq += 1
            data = encode_batch(Batch(self.agent, self._seq, wall, chunk))
            self._buffer.append((data, len(chunk)))
            while len(self._buffer) > self.max_buffered:
                _, lost = self._buffer.popleft()
                self.stats.dropped_batches += 1
                self.stats.dropped_samples += lost

    def _registration_bytes(self) -> bytes:
        """The encoded registry entry, re-encoded only when the registration changed."""
        reg = self.registration()
        if self._encoded is None or self._encoded[0] != reg:
            self._encoded = (reg, encode_registration(reg))
        return self._encoded[1]

    async def flush(self, *, force_heartbeat: bool = False) -> bool:
        """One attempt to write buffered batches (+ heartbeat when due). Returns success."""
        now = time.monotonic()
        heartbeat = force_heartbeat or now >= self._next_heartbeat
        if not self._buffer and not heartbeat:
            return True
        sending = list(self._buffer)
        pipe = self.redis.pipeline(transaction=False)
        for data, _ in sending:
            pipe.xadd(self.stream, {STREAM_FIELD: data}, maxlen=self.stream_maxlen,
                      approximate=True)
        if heartbeat:
            pipe.set(self.keys.heartbeat(self.agent), f"{time.time():.3f}",
                     ex=self.heartbeat_ttl_s)
            pipe.set(self.keys.registration(self.agent), self._registration_bytes(),
                     ex=self.heartbeat_ttl_s * REGISTRATION_TTL_FACTOR)
        try:
            async with asyncio.timeout(self.op_timeout_s):
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.publish_errors += 1
            if self.stats.connected:
                log.warning("redis unavailable, buffering", agent=self.agent, error=str(exc),
                            buffered=len(self._buffer))
            self.stats.connected = False
            return False
        finally:
            await pipe.reset()  # type: ignore[no-untyped-call]
        if not self.stats.connected:
            self.stats.reconnects += 1
            self.stats.connected = True
        for _ in sending:  # the buffer only grew at its right end meanwhile (one task)
            _, count = self._buffer.popleft()
            self.stats.batches_published += 1
            self.stats.samples_published += count
        if heartbeat:
            self.stats.heartbeats += 1
            self._next_heartbeat = now + self.heartbeat_interval_s
        return True

    async def step(self) -> None:
        """Seal and, unless backing off after a failure, flush."""
        self.seal()
        now = time.monotonic()
        if now < self._retry_at:
            return
        if await self.flush():
            self._backoff = 0.0
        else:
            self._backoff = min(max(self._backoff * 2, self.publish_interval_s),
                                self.max_backoff_s)
            self._retry_at = time.monotonic() + self._backoff

    async def run(self) -> None:
        """Publish forever (cancel to stop; call :meth:`final_flush` first on shutdown)."""
        while True:  # the agent runs its own loop (_publish_loop); this is for direct use
            await self.step()
            await asyncio.sleep(self.publish_interval_s)

    async def final_flush(self, timeout_s: float) -> bool:
        """Seal what is pending and try once to write it, bounded by ``timeout_s``."""
        self.seal()
        try:
            async with asyncio.timeout(timeout_s):
                return await self.flush()
        except TimeoutError:
            return False

    async def deregister(self, timeout_s: float) -> None:
        """Clean shutdown: drop the heartbeat so the oracle sees us gone at once (the registry
        entry stays until its TTL: it describes the host, not the process)."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.redis.delete(self.keys.heartbeat(self.agent))
