"""Who may report on what: the oracle's identity checks and the Redis ACLs behind them.

An agent may only report on its own host's links. Two layers enforce it:

1. **Redis ACL users, one per agent** (:func:`agent_acl_rules`). User ``<agent>`` may
   ``XADD`` only to its own stream ``<prefix>{s<shard>}:samples:<agent>`` and ``SET``/``DEL``
   only its own heartbeat and registry keys (one registry key per agent, so no agent can write,
   expire or retype another's entry); it may *read* (``SCAN``, ``MGET``, ``GET``) its peers'
   registry entries and heartbeats, which it needs to build its pinglist, and nothing else.
   So the stream a batch arrives on authenticates its author: another agent cannot write
   there. The oracle still accepts a registry entry only for the agent its key names and only
   if every link it binds is owned by that agent in the topology.
2. **The oracle checks every batch** (:meth:`Ownership.check`): the batch's ``agent`` must be
   the stream's owner, every sample's ``reporter`` must be that agent, and each sample's
   subject must belong to it: a host agent reports its own NICs, RDMA devices and probes to
   known peers; a switch agent (a leaf or pod name) reports the ports its registration binds
   to its own ``<switch>/up|down`` links. Hosts and switches are translated the same way,
   through the registration (interface -> tx link, rx link); the only difference is the
   fallback before a registration is known: a host's interfaces are its NIC, while a switch
   port's links cannot be guessed from its name, so its samples are refused
   (``unregistered``) until the oracle has read its entry. Anything else is rejected whole
   and counted by reason.

We chose ACLs plus checks over signed batches: no key distribution to build, and Redis
already authenticates every connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from netkv.contracts.names import RedisKeys, shard_of
from netkv.contracts.registration import (
    LinkOwnershipError,
    LinkPair,
    RegistrationError,
    decode_registration,
    resolve_links,
)
from netkv.contracts.samples import NicSample, QdiscSample, RdmaSample, RttSample, Sample
from netkv.contracts.wire import Batch
from netkv.core.topology import Topology

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
    """``ACL SETUSER <agent> ...`` rules: least privilege for a working agent.

    Writes (``XADD``, ``SET``, ``DEL``) reach only the agent's own stream, heartbeat and
    registry key (``~key`` grants read and write on exactly those); reads (``SCAN``, ``MGET``,
    ``GET``) reach its peers' registry entries and heartbeats (``%R~pattern``: read only).
    No other command is allowed: no ``EXPIRE``, ``HSET``, ``RENAME``, ``XRANGE``, no
    channels. Also correct on a Redis Cluster (``CLUSTER``/``READONLY`` for slot discovery).
    """
    own = (keys.samples_stream(agent), keys.heartbeat(agent), keys.registration(agent))
    return ["reset", "on", f">{password}", *(f"~{key}" for key in own),
            f"%R~{keys.registrations_pattern}", f"%R~{keys.heartbeats_pattern}",
            "resetchannels",
            "+xadd", "+set", "+del", "+get", "+mget", "+scan", "+ping", "+hello", "+auth",
            "+client|setname", "+cluster|slots", "+cluster|shards",
            "+cluster|nodes", "+readonly"]


@dataclass(frozen=True, slots=True)
class Binding:
    """An agent's registered interfaces and the topology links they describe (indices)."""

    nics: frozenset[str]
    links: dict[str, tuple[int, int]]  # interface -> (tx link, rx link)
    rdma: dict[str, tuple[int, int]]  # "<device>/<port>" -> (tx link, rx link)


def binding_from_registration(topology: Topology, agent: str, raw: bytes) -> Binding:
    """Validate an agent's registry entry against the topology (strict).

    Every link it binds must exist and be owned by the agent: a registration that claims
    another host's links is refused whole (:class:`RejectedError`, reason
    ``bad_registration``), so its samples cannot be steered onto them.
    """
    try:
        reg = decode_registration(raw)
    except RegistrationError as exc:
        raise RejectedError("bad_registration", exc.where, str(exc)) from None
    if reg.agent != agent:
        raise RejectedError("bad_registration", "registration.agent",
                            f"entry of {agent!r} names {reg.agent!r}")

    def resolve(table: dict[str, LinkPair], where: str) -> dict[str, tuple[int, int]]:
        try:
            return resolve_links(topology, agent, table)
        except LinkOwnershipError as exc:
            raise RejectedError("bad_registration", f"registration.{where}.{exc.key}",
                                f"{exc.link!r} is not a link of {agent!r}") from None

    links = resolve(reg.links, "links")
    return Binding(frozenset(reg.nics) | frozenset(links), links, resolve(reg.rdma, "rdma"))


@dataclass
class Ownership:
    """Checks batches against the topology and the agents' registered NICs."""

    topology: Topology
    require_registered_nics: bool = False
    bindings: dict[str, Binding] = field(default_factory=dict)
    _switches: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        owners = {lk.owner for lk in self.topology.links}
        self._switches = frozenset(owners - set(self.topology.host_index))

    def check(self, batch: Batch, owner: str) -> None:
        """Raise :class:`RejectedError` unless every sample is the stream owner's to report."""
        if batch.agent != owner:
            raise RejectedError("wrong_agent", "batch.agent",
                           f"batch from {batch.agent!r} on the stream of {owner!r}")
        hosts = self.topology.host_index
        is_host = owner in hosts
        if not is_host and owner not in self._switches:
            raise RejectedError("unknown_agent", "batch.agent", f"{owner!r} is not in the topology")
        samples = batch.samples
        # The common case as set operations (C speed): one reporter, and RTT peers that are
        # other hosts. Then only the other samples are walked; on any doubt every sample is,
        # and the walk names the field.
        todo: Iterable[tuple[int, Sample]] = enumerate(samples)
        if {s.reporter for s in samples} <= {owner}:
            peers = {s.peer for s in samples if type(s) is RttSample}
            if not peers or (is_host and owner not in peers and peers <= hosts.keys()):
                todo = [(i, s) for i, s in enumerate(samples) if type(s) is not RttSample]
        binding = self.bindings.get(owner)
        for i, s in todo:
            where = f"batch.samples[{i}]"
            if s.reporter != owner:
                raise RejectedError("wrong_reporter", f"{where}.reporter",
                               f"{owner!r} may not report as {s.reporter!r}")
            if isinstance(s, RttSample):
                if not is_host or s.peer not in self.topology.host_index or s.peer == owner:
                    raise RejectedError("unknown_peer", f"{where}.peer",
                                   f"{s.peer!r} is not another host of the topology")
            elif isinstance(s, NicSample | QdiscSample):
                if binding is None and not is_host:
                    raise RejectedError("unregistered", f"{where}.nic",
                                        f"switch {owner!r} has no registration binding "
                                        f"{s.nic!r} to its links")
                if self._foreign_nic(s.nic, binding):
                    raise RejectedError("foreign_link", f"{where}.nic",
                                        f"{s.nic!r} is not an interface of {owner!r}")
            elif isinstance(s, RdmaSample) and (
                    not is_host or (binding is None and self.require_registered_nics)):
                raise RejectedError("foreign_link", f"{where}.device",
                                    f"{s.device!r} is not an RDMA device of {owner!r}")

    def _foreign_nic(self, nic: str, binding: Binding | None) -> bool:
        if binding is not None:
            return nic not in binding.nics
        # An unregistered host: another host's link name (h001/nic/up) is never an
        # interface name.
        return "/" in nic or self.require_registered_nics

    def nic_links(self, agent: str, nic: str) -> tuple[int | None, int | None]:
        """The (tx, rx) links an accepted NIC sample loads; None where it loads nothing.

        Registered agents, hosts and switches alike: their bindings (an unbound interface
        describes no link). An unregistered host: its own NIC links. (An unregistered
        switch's samples never get here: :meth:`check` refuses them.)
        """
        binding = self.bindings.get(agent)
        if binding is not None:
            return binding.links.get(nic, (None, None))
        host = self.topology.host_index.get(agent)
        if host is not None:
            return int(self.topology.up_chain[host, 0]), int(self.topology.down_chain[host, 0])
        return None, None

    def rdma_links(self, agent: str, device: str, port: int) -> tuple[int | None, int | None]:
        binding = self.bindings.get(agent)
        if binding is not None:
            return binding.rdma.get(f"{device}/{port}", (None, None))
        host = self.topology.host_index[agent]
        return int(self.topology.up_chain[host, 0]), int(self.topology.down_chain[host, 0])


def shard_streams(keys: RedisKeys, agents: list[str]) -> dict[int, list[str]]:
    """Group agents' stream names by shard (one XREADGROUP per shard)."""
    out: dict[int, list[str]] = {}
    for agent in agents:
        out.setdefault(shard_of(agent, keys.shards), []).append(keys.samples_stream(agent))
    return out
