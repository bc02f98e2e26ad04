"""What an agent tells the registry about itself, and how peers and the oracle read it.

Each agent writes one field of the registry hash (``RedisKeys.registry``): key = agent id,
value = msgpack map::

    {"v": 1, "agent": "h003", "address": "127.0.0.13", "echo_port": 40123,
     "bandwidth_port": 0, "version": "0.1.0", "started": 1764300000.0,
     "nics": ["eth0"],
     "links": {"eth0": {"tx": "h003/nic/up", "rx": "h003/nic/down"}},
     "rdma": {"mlx5_0/1": {"tx": "h003/nic/up", "rx": "h003/nic/down"}}}

``links`` is how the oracle turns a :class:`~netkv.telemetry.samples.NicSample` (reporter +
interface name) into topology links: the interface's transmit rate loads ``tx``, its receive
rate loads ``rx``. ``rdma`` does the same for RDMA samples keyed ``<device>/<port>``. An
interface without a binding is reported but describes no topology link.

Agents re-write their entry with every heartbeat, so a Redis restart (which loses the hash)
heals within one heartbeat interval. :func:`decode_registration` is strict: a malformed entry
is rejected with a :class:`RegistrationError` naming the field; callers skip and count it.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack

REGISTRATION_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")
MAX_ENTRY_BYTES = 16 * 1024


class RegistrationError(ValueError):
    """A registry entry that does not follow the format."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass(frozen=True, slots=True)
class LinkPair:
    """The directed topology links an interface's (or RDMA port's) tx and rx describe."""

    tx: str
    rx: str


@dataclass(frozen=True, slots=True)
class Registration:
    agent: str
    address: str
    echo_port: int
    version: str
    started: float
    bandwidth_port: int = 0
    nics: tuple[str, ...] = ()
    links: dict[str, LinkPair] = field(default_factory=dict)
    rdma: dict[str, LinkPair] = field(default_factory=dict)


def encode_registration(reg: Registration) -> bytes:
    body = {
        "v": REGISTRATION_VERSION, "agent": reg.agent, "address": reg.address,
        "echo_port": reg.echo_port, "bandwidth_port": reg.bandwidth_port,
        "version": reg.version, "started": reg.started, "nics": list(reg.nics),
        "links": {k: {"tx": v.tx, "rx": v.rx} for k, v in reg.links.items()},
        "rdma": {k: {"tx": v.tx, "rx": v.rx} for k, v in reg.rdma.items()},
    }
    out: bytes = msgpack.packb(body, use_bin_type=True)
    return out


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise RegistrationError(where, f"expected a name, got {value!r:.80}")
    return value


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise RegistrationError(where, f"expected a port 0..65535, got {value!r:.40}")
    return value


def _pairs(value: Any, where: str) -> dict[str, LinkPair]:
    if not isinstance(value, dict):
        raise RegistrationError(where, "expected a map")
    out: dict[str, LinkPair] = {}
    for key, pair in value.items():
        path = f"{where}.{key}"
        if not isinstance(pair, dict) or set(pair) != {"tx", "rx"}:
            raise RegistrationError(path, "expected {tx: LINK, rx: LINK}")
        out[_name(key, where)] = LinkPair(_name(pair["tx"], f"{path}.tx"),
                                          _name(pair["rx"], f"{path}.rx"))
    return out


_FIELDS = {"v", "agent", "address", "echo_port", "bandwidth_port", "version", "started",
           "nics", "links", "rdma"}


def decode_registration(data: bytes) -> Registration:
    """Parse one registry entry strictly."""
    if len(data) > MAX_ENTRY_BYTES:
        raise RegistrationError("registration", f"{len(data)} bytes is too large")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as exc:
        raise RegistrationError("registration", f"not msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise RegistrationError("registration", "expected a map")
    if raw.get("v") != REGISTRATION_VERSION:
        raise RegistrationError("registration.v", f"unsupported version {raw.get('v')!r}")
    if set(raw) != _FIELDS:
        odd = sorted(str(k) for k in set(raw) ^ _FIELDS)
        raise RegistrationError(f"registration.{odd[0]}", "unknown or missing field")
    address = raw["address"]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise RegistrationError("registration.address",
                                f"not an IP address: {address!r:.60}") from None
    started = raw["started"]
    if isinstance(started, bool) or not isinstance(started, int | float) \
            or not math.isfinite(started) or started < 0:
        raise RegistrationError("registration.started", "expected a unix time")
    version = raw["version"]
    if not isinstance(version, str) or len(version) > 64:
        raise RegistrationError("registration.version", "expected a short string")
    nics = raw["nics"]
    if not isinstance(nics, list) or len(nics) > 64:
        raise RegistrationError("registration.nics", "expected a list of interface names")
    return Registration(
        agent=_name(raw["agent"], "registration.agent"), address=address,
        echo_port=_port(raw["echo_port"], "registration.echo_port"), version=version,
        started=float(started),
        bandwidth_port=_port(raw["bandwidth_port"], "registration.bandwidth_port"),
        nics=tuple(_name(n, f"registration.nics[{i}]") for i, n in enumerate(nics)),
        links=_pairs(raw["links"], "registration.links"),
        rdma=_pairs(raw["rdma"], "registration.rdma"))
