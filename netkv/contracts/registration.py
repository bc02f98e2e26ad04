"""What an agent tells the registry about itself, and how peers and the oracle read it.

Each agent writes its own registry key (``RedisKeys.registration(agent)``, one key per agent so
a Redis ACL lets it write only its own entry), value = msgpack map::

    {"v": 1, "agent": "h003", "address": "127.0.0.13", "echo_port": 40123,
     "bandwidth_port": 0, "version": "0.1.0", "started": 1764300000.0,
     "nics": ["eth0"],
     "links": {"eth0": {"tx": "h003/nic/up", "rx": "h003/nic/down"}},
     "rdma": {"mlx5_0/1": {"tx": "h003/nic/up", "rx": "h003/nic/down"}}}

``links`` is how the oracle turns a :class:`~netkv.contracts.samples.NicSample` (reporter +
interface name) into topology links: the interface's transmit rate loads ``tx``, its receive
rate loads ``rx``. ``rdma`` does the same for RDMA samples keyed ``<device>/<port>``. An
interface without a binding is reported but describes no topology link.

Agents re-write their entry with every heartbeat (and it expires when they stop), so a Redis
restart heals within one heartbeat interval. :func:`decode_registration` is strict: a
malformed entry is rejected with a :class:`RegistrationError` naming the field; callers skip
and count it. ``bandwidth_port``, ``nics``, ``links`` and ``rdma`` may be omitted (their
defaults); every other field is required.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from netkv.contracts.errors import ContractError, from_msgspec
from netkv.contracts.fields import Name, Port, UnixTime
from netkv.contracts.names import RedisKeys
from netkv.core.topology import Topology

REGISTRATION_VERSION: Literal[1] = 1
MAX_ENTRY_BYTES = 16 * 1024


class RegistrationError(ContractError):
    """A registry entry that does not follow the format (``reason`` is
    ``bad_registration``)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__("bad_registration", where, message)


class LinkPair(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The directed topology links an interface's (or RDMA port's) tx and rx describe."""

    tx: Name
    rx: Name


class Registration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    agent: Name
    address: Annotated[str, msgspec.Meta(max_length=64)]
    echo_port: Port
    version: Annotated[str, msgspec.Meta(max_length=64)]
    started: UnixTime
    bandwidth_port: Port = 0
    nics: Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)] = ()
    links: Annotated[dict[Name, LinkPair], msgspec.Meta(max_length=64)] = {}
    rdma: Annotated[dict[Name, LinkPair], msgspec.Meta(max_length=64)] = {}

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise ValueError(f"address: not an IP address: {self.address!r:.60}") from None


class _Wire(Registration, frozen=True, kw_only=True):
    v: Literal[1]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Wire)


def encode_registration(reg: Registration) -> bytes:
    wire = _Wire(**msgspec.structs.asdict(reg), v=REGISTRATION_VERSION)
    return _ENCODER.encode(wire)


def decode_registration(data: bytes) -> Registration:
    """Parse one registry entry strictly."""
    if len(data) > MAX_ENTRY_BYTES:
        raise RegistrationError("registration", f"{len(data)} bytes is too large")
    try:
        wire = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise _located(exc, data) from None
    except msgspec.DecodeError as exc:
        raise RegistrationError("registration", f"not msgpack: {exc}") from None
    fields = msgspec.structs.asdict(wire)
    del fields["v"]
    return Registration(**fields)


def _located(exc: msgspec.ValidationError, data: bytes) -> RegistrationError:
    error = from_msgspec(exc, "registration", lambda: msgspec.msgpack.decode(data))
    message = str(error).split(": ", 1)[-1]
    where = error.where
    if where == "registration" and message.startswith("address:"):
        return RegistrationError("registration.address", message.removeprefix("address: "))
    if "[...]" in where:  # msgspec does not name map keys: find the entry ourselves
        where = _bad_entry(msgspec.msgpack.decode(data), where.split("[...]")[0])
    return RegistrationError(where, message)


def _bad_entry(raw: Any, where: str) -> str:
    table = raw.get(where.rsplit(".", 1)[-1]) if isinstance(raw, dict) else None
    if isinstance(table, dict):
        for key, pair in table.items():
            try:
                msgspec.convert(key, Name)
                msgspec.convert(pair, LinkPair)
            except msgspec.ValidationError:
                return f"{where}.{key}"
    return where


async def read_registry(redis: Any, keys: RedisKeys) -> dict[str, bytes]:
    """Every agent's raw registry entry, by agent id (SCAN the per-agent keys, one MGET: they
    share the ``{reg}`` slot). ``redis`` is a redis.asyncio client (standalone or cluster);
    entries are not decoded here (callers cache decoded entries by their bytes)."""
    names: list[str] = []
    async for raw in redis.scan_iter(match=keys.registrations_pattern, count=1000):
        names.append(raw.decode() if isinstance(raw, bytes) else str(raw))
    if not names:
        return {}
    values = await redis.mget(names)
    out: dict[str, bytes] = {}
    for name, value in zip(names, values, strict=True):
        agent = keys.registration_owner(name)
        if agent is not None and isinstance(value, bytes):
            out[agent] = value
    return out


class LinkOwnershipError(ValueError):
    """A binding names a link that is not in the topology or not the agent's own."""

    def __init__(self, key: str, link: str, owner: str | None, agent: str) -> None:
        why = ("unknown topology link" if owner is None
               else f"link belongs to {owner!r}, not to this agent ({agent!r})")
        super().__init__(f"{link!r}: {why}")
        self.key, self.link, self.owner = key, link, owner


def resolve_links(topology: Topology, agent: str,
                  table: Mapping[str, LinkPair]) -> dict[str, tuple[int, int]]:
    """``{interface or port: (tx link index, rx link index)}``, if every link of ``table``
    exists in ``topology`` and is owned by ``agent`` (the one ownership rule, used by the
    agent at start-up and by the oracle for every registry entry); else
    :class:`LinkOwnershipError` for the first that is not."""
    out: dict[str, tuple[int, int]] = {}
    for key, pair in table.items():
        ids = []
        for link in (pair.tx, pair.rx):
            index = topology.link_index.get(link)
            owner = topology.links[index].owner if index is not None else None
            if index is None or owner != agent:
                raise LinkOwnershipError(key, link, owner, agent)
            ids.append(index)
        out[key] = (ids[0], ids[1])
    return out
