"""Every Redis key and MQTT topic NetKV uses, in one place.

Redis keys are Redis Cluster safe: a key that must meet others in one command carries a hash
tag. Samples go to one stream per agent, ``<prefix>{s<shard>}:samples:<agent>``; the shard
(a stable hash of the agent id) groups streams into a fixed number of slots so that the oracle
can read a whole shard with one XREADGROUP, while per-agent stream names let a Redis ACL pin
each agent to its own stream (``~<prefix>{s*}:samples:<agent>``).

The registry is one key per agent, ``<prefix>{reg}:agent:<agent>`` (a string holding the
msgpack :class:`~netkv.contracts.registration.Registration`, with a TTL), so an ACL can let an
agent write and expire only its own entry while it reads everyone's
(``%W~<prefix>{reg}:agent:<agent>``, ``%R~<prefix>{reg}:agent:*``). The ``{reg}`` hash tag
keeps every entry in one slot, so one ``MGET`` reads them all on a Redis Cluster too.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

SHARDS = 16


def shard_of(agent: str, shards: int = SHARDS) -> int:
    """The stream shard an agent writes to (stable across processes and versions)."""
    return zlib.crc32(agent.encode()) % shards


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str = "netkv:"
    shards: int = SHARDS

    def samples_stream(self, agent: str) -> str:
        return f"{self.prefix}{{s{shard_of(agent, self.shards)}}}:samples:{agent}"

    def shard_streams_pattern(self, shard: int) -> str:
        return f"{self.prefix}{{s{shard}}}:samples:*"

    def heartbeat(self, agent: str) -> str:
        return f"{self.prefix}agent:{agent}:heartbeat"

    def registration(self, agent: str) -> str:
        """String: the agent's msgpack registration (address, ports, NICs, version)."""
        return f"{self.prefix}{{reg}}:agent:{agent}"

    @property
    def registrations_pattern(self) -> str:
        """SCAN/ACL pattern matching every agent's registration key."""
        return f"{self.prefix}{{reg}}:agent:*"

    def registration_owner(self, key: str) -> str | None:
        """The agent a registration key belongs to (None if it is not one)."""
        head = f"{self.prefix}{{reg}}:agent:"
        return key[len(head):] or None if key.startswith(head) else None

    @property
    def heartbeats_pattern(self) -> str:
        return f"{self.prefix}agent:*:heartbeat"

    @property
    def map_snapshot(self) -> str:
        return f"{self.prefix}{{map}}:snapshot"

    @property
    def map_version(self) -> str:
        return f"{self.prefix}{{map}}:version"

    @property
    def oracle_lock(self) -> str:
        return f"{self.prefix}{{map}}:leader"

    @property
    def consumer_group(self) -> str:
        return "netkv-oracle"


@dataclass(frozen=True, slots=True)
class MqttTopics:
    prefix: str = "netkv/v1/"

    @property
    def map_version(self) -> str:
        """Retained, QoS 1: the newest map version (a small msgpack/JSON announcement)."""
        return f"{self.prefix}map/version"

    def agent_status(self, agent: str) -> str:
        """Retained, QoS 1: ``online`` on connect, ``offline`` via the last will."""
        return f"{self.prefix}agents/{agent}/status"

    @property
    def agent_status_all(self) -> str:
        return f"{self.prefix}agents/+/status"
