"""A redis.asyncio client from :class:`~netkv.config.RedisSettings` (ACL user, password, TLS).

The client retries a command once the server is back (bounded backoff), so a Redis restart
costs the caller a failed call or two, never a dead process. Callers own the client with
``async with connect_redis(...) as redis:``.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from netkv.adapters.tls import client_context
from netkv.config import RedisSettings, reveal


def connect_redis(settings: RedisSettings, *, retries: int = 3) -> aioredis.Redis:
    """A lazily connecting client; use it as an async context manager to close it."""
    kwargs: dict[str, object] = {}
    if settings.tls or settings.url.startswith("rediss://"):
        context = client_context(settings.ca_file, settings.cert_file, settings.key_file)
        kwargs = {"ssl_ca_certs": settings.ca_file, "ssl_certfile": settings.cert_file,
                  "ssl_keyfile": settings.key_file,
                  "ssl_check_hostname": context.check_hostname}
    url = settings.url
    if settings.tls and url.startswith("redis://"):
        url = "rediss://" + url.removeprefix("redis://")
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        username=settings.username,
        password=reveal(settings.password),
        socket_timeout=settings.timeout_s,
        socket_connect_timeout=settings.timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        retry_on_error=[aioredis.ConnectionError, aioredis.TimeoutError],
        health_check_interval=15,
        **kwargs,  # type: ignore[arg-type]
    )
    return client
