"""Who may report on what: the oracle's identity checks and the Redis ACLs behind them.

An agent may only report on its own host's links. Two layers enforce it:

1. **Redis ACL users, one per agent** (:func:`agent_acl_rules`). User ``<agent>`` may
   ``XADD`` only to its own stream ``<prefix>{s<shard>}:samples:<agent>``, write its own
   heartbeat key and the registry hash, and read nothing else. So the stream a batch arrives
   on authenticates its author: another agent cannot write there. (Limitation: ACLs are per
   key, so the registry hash is writable by every agent; the oracle only uses it for NIC
   names, and only when ``require_registered_nics`` is set.)
2. **The oracle checks every batch** (:meth:`Ownership.check`): the batch's ``agent`` must be
   the stream's owner, every sample's ``reporter`` must be that agent, and each sample's
   subject must belong to it: a host agent reports its own NICs, RDMA devices and probes to
   known peers; a switch agent (a leaf or pod name) reports only ``up``/``down`` of its own
   links. Anything else is rejected whole and counted by reason.

We chose ACLs plus checks over signed batches: no key distribution to build, and Redis
already authenticates every connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from netkv.core.topology import Topology
from netkv.telemetry.names import RedisKeys, shard_of
from netkv.telemetry.samples import NicSample, QdiscSample, RdmaSample, RttSample
from netkv.telemetry.wire import Batch

SAMPLES_MARK = ":samples:"


class RejectedError(ValueError):
    """A batch that decoded but must not be applied; ``reason`` is a metric label."""

    def __init__(self, reason: str, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.reason = reason
        self.where = where


def stream_owner(keys: RedisKeys, stream: str) -> str | None:
    """The agent a sample stream belongs to, or None if the name is not a sample stream of
    this prefix (or sits in the wrong shard, which only a hand-made key would)."""
    if not stream.startswith(keys.prefix) or SAMPLES_MARK not in stream:
        return None
    agent = stream.rsplit(SAMPLES_MARK, 1)[1]
    if not agent or keys.samples_stream(agent) != stream:
        return None
    return agent


def agent_acl_rules(keys: RedisKeys, agent: str, password: str) -> list[str]:
    """``ACL SETUSER <agent> ...`` rules that confine an agent to its own keys.

    Also correct on a Redis Cluster (``CLUSTER``/``READONLY`` are allowed for slot discovery).
    """
    stream = keys.samples_stream(agent)
    return ["reset", "on", f">{password}", f"~{stream}", f"~{keys.heartbeat(agent)}",
            f"~{keys.registry}", "resetchannels",
            "+xadd", "+xtrim", "+set", "+expire", "+hset", "+ping", "+hello", "+auth",
            "+client|setname", "+cluster|slots", "+cluster|shards",
            "+cluster|nodes", "+readonly", "+info"]


def parse_registration(raw: bytes) -> frozenset[str] | None:
    """NIC names from an agent's registry entry (msgpack map with ``nics``: names or maps
    with ``name``); None when the entry is unreadable or names no NICs."""
    try:
        entry: Any = msgpack.unpackb(raw, raw=False, max_str_len=256, max_array_len=256,
                                     max_map_len=64, max_bin_len=4096)
    except Exception:
        return None
    nics = entry.get("nics") if isinstance(entry, dict) else None
    if not isinstance(nics, list):
        return None
    names = {n["name"] if isinstance(n, dict) else n for n in nics}
    return frozenset(n for n in names if isinstance(n, str)) or None


@dataclass
class Ownership:
    """Checks batches against the topology and the agents' registered NICs."""

    topology: Topology
    require_registered_nics: bool = False
    nics: dict[str, frozenset[str]] = field(default_factory=dict)
    _switches: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        owners = {lk.owner for lk in self.topology.links}
        self._switches = frozenset(owners - set(self.topology.host_index))

    def check(self, batch: Batch, owner: str) -> None:
        """Raise :class:`RejectedError` unless every sample is the stream owner's to report."""
        if batch.agent != owner:
            raise RejectedError("wrong_agent", "batch.agent",
                           f"batch from {batch.agent!r} on the stream of {owner!r}")
        is_host = owner in self.topology.host_index
        if not is_host and owner not in self._switches:
            raise RejectedError("unknown_agent", "batch.agent", f"{owner!r} is not in the topology")
        registered = self.nics.get(owner)
        for i, s in enumerate(batch.samples):
            where = f"batch.samples[{i}]"
            if s.reporter != owner:
                raise RejectedError("wrong_reporter", f"{where}.reporter",
                               f"{owner!r} may not report as {s.reporter!r}")
            if isinstance(s, RttSample):
                if not is_host or s.peer not in self.topology.host_index or s.peer == owner:
                    raise RejectedError("unknown_peer", f"{where}.peer",
                                   f"{s.peer!r} is not another host of the topology")
            elif isinstance(s, NicSample | QdiscSample):
                if not is_host:
                    if s.nic not in ("up", "down") or \
                            f"{owner}/{s.nic}" not in self.topology.link_index:
                        raise RejectedError("foreign_link", f"{where}.nic",
                                       f"switch agent {owner!r} has no link {s.nic!r}")
                elif self._foreign_nic(s.nic, registered):
                    raise RejectedError("foreign_link", f"{where}.nic",
                                   f"{s.nic!r} is not a NIC of {owner!r}")
            elif isinstance(s, RdmaSample) and not is_host:
                raise RejectedError("foreign_link", f"{where}.device",
                               f"switch agent {owner!r} has no RDMA device")

    def _foreign_nic(self, nic: str, registered: frozenset[str] | None) -> bool:
        # A host's NIC names are only known from its registration; another host's link
        # name (h001/nic/up) is never a NIC name.
        if "/" in nic:
            return True
        if registered is None:
            return self.require_registered_nics
        return nic not in registered


def shard_streams(keys: RedisKeys, agents: list[str]) -> dict[int, list[str]]:
    """Group agents' stream names by shard (one XREADGROUP per shard)."""
    out: dict[int, list[str]] = {}
    for agent in agents:
        out.setdefault(shard_of(agent, keys.shards), []).append(keys.samples_stream(agent))
    return out
