"""An aiomqtt client from :class:`~netkv.config.MqttSettings` (credentials, TLS, last will).

aiomqtt clients are single-use per connection; reconnecting is the caller's loop (see
:func:`reconnecting`), which keeps recovery in one visible place as aiomqtt recommends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiomqtt
import structlog

from netkv.adapters.tls import client_context
from netkv.config import MqttSettings, reveal

log = structlog.get_logger(__name__)


def mqtt_client(settings: MqttSettings, *, identifier: str | None = None,
                will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    """A client for one connection; enter it with ``async with``."""
    tls_context = None
    if settings.tls:
        tls_context = client_context(settings.ca_file, settings.cert_file, settings.key_file)
    return aiomqtt.Client(
        settings.host, settings.port, identifier=identifier, username=settings.username,
        password=reveal(settings.password), keepalive=settings.keepalive_s, will=will,
        tls_context=tls_context, timeout=5.0)


async def reconnecting(
    settings: MqttSettings, session: Callable[[aiomqtt.Client], Awaitable[None]], *,
    identifier: str | None = None, will: aiomqtt.Will | None = None,
    on_state: Callable[[bool], None] | None = None, max_backoff_s: float = 5.0,
) -> None:
    """Run ``session(client)`` forever, reconnecting with capped exponential backoff.

    ``on_state(True/False)`` reports connectivity so services can expose it in health checks.
    Cancellation ends the loop.
    """
    backoff = 0.1
    while True:
        try:
            async with mqtt_client(settings, identifier=identifier, will=will) as client:
                backoff = 0.1
                if on_state:
                    on_state(True)
                await session(client)
        except aiomqtt.MqttError as exc:
            log.warning("mqtt disconnected", error=str(exc), retry_in_s=backoff)
        if on_state:
            on_state(False)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff_s)


async def messages(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    """Iterate a connected client's messages (typed wrapper for the async iterator)."""
    async for message in client.messages:
        yield message
