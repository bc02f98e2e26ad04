"""MQTT presence: ``online`` while the agent lives, ``offline`` when it dies or stops.

On every (re)connection the agent publishes ``online`` (QoS 1, retained) to
``MqttTopics.agent_status(agent)`` and registers ``offline`` (QoS 1, retained) as its last
will, so a crash, a kill or a lost network makes the broker announce ``offline`` after the
keepalive. A clean shutdown sends ``offline`` itself before disconnecting, because a clean
DISCONNECT discards the will. Retained, so a subscriber that arrives later still learns the
state. Reconnection uses :func:`netkv.adapters.mqtt_client.reconnecting` (capped backoff).
"""

from __future__ import annotations

import asyncio

import aiomqtt
import structlog

from netkv.adapters.mqtt_client import reconnecting
from netkv.config import MqttSettings
from netkv.contracts.names import MqttTopics

log = structlog.get_logger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"


class Presence:
    """Run :meth:`run` as a task; call :meth:`announce_offline` before cancelling it."""

    def __init__(self, settings: MqttSettings, agent: str) -> None:
        self.settings = settings
        self.agent = agent
        self.topic = MqttTopics(settings.prefix).agent_status(agent)
        self.connected = False
        self.online_published = asyncio.Event()
        self._stop = asyncio.Event()
        self._offline_sent = asyncio.Event()

    def _on_state(self, up: bool) -> None:
        self.connected = up

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.publish(self.topic, ONLINE, qos=1, retain=True)
        self.online_published.set()
        await self._stop.wait()
        await client.publish(self.topic, OFFLINE, qos=1, retain=True)
        self._offline_sent.set()
        await asyncio.Event().wait()  # stay connected until cancelled: a clean disconnect

    async def run(self) -> None:
        will = aiomqtt.Will(self.topic, OFFLINE, qos=1, retain=True)
        await reconnecting(self.settings, self._session, identifier=f"netkv-agent-{self.agent}",
                           will=will, on_state=self._on_state)

    async def announce_offline(self, timeout_s: float) -> bool:
        """Publish ``offline`` (if connected) within ``timeout_s``; True if it was sent."""
        self._stop.set()
        if not self.connected:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                await self._offline_sent.wait()
        except TimeoutError:
            return False
        return True
