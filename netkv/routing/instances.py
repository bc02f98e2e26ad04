"""The decode and prefill instances a router chooses among, and their live load.

Instances come from the topology file and may be registered or refreshed at run time (the
scheduler's ``POST /v1/instances``): an engine or its sidecar reports running and waiting
requests and KV cache use. Loads may also be scraped from an engine's Prometheus endpoint
(:mod:`netkv.routing.scrape`).

Decode load is kept in flat numpy arrays indexed like :attr:`InstanceRegistry.decoders`, so a
decision reads it without building anything per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from netkv.core.topology import FloatArray, IntArray, Role, Topology
from netkv.errors import InputError


@dataclass(frozen=True, slots=True)
class Load:
    """One load report: requests running and waiting, KV cache use in [0, 1], and (when
    known) the KV memory in tokens."""

    running: float = 0.0
    waiting: float = 0.0
    kv_use: float = 0.0
    capacity_tokens: float | None = None


@dataclass(slots=True)
class InstanceInfo:
    """What the registry knows of one instance (``index`` is into the role's arrays)."""

    name: str
    role: Role
    host: str
    host_index: int
    index: int
    metrics_url: str | None = None
    source: str = "topology"  # topology | registered
    updated_ts: float = 0.0
    scrape_error: str | None = None
    expires_ts: float | None = None  # registered instances expire unless refreshed


class RegistryFullError(InputError):
    """The cap on registered instances is reached (answered 429)."""


class InstanceRegistry:
    """Instances by name plus per-decoder load arrays (running, waiting, kv_use).

    Topology instances stay for the life of the process. Instances registered at run time
    are bounded (``max_registered``), expire ``ttl_s`` after their last registration or
    refresh, and can be removed; removing a decoder compacts the arrays (indices shift).
    """

    def __init__(self, topology: Topology, capacity_tokens: float = 500_000.0, *,
                 max_registered: int = 256, ttl_s: float = 60.0,
                 clock: Callable[[], float] = time.time,
                 scrape_allow: Collection[str] = ()) -> None:
        self.scrape_allow = frozenset(scrape_allow)
        self.max_registered = max_registered
        self.ttl_s = ttl_s
        self.clock = clock
        self.registered = 0
        self.topology = topology
        self.by_name: dict[str, InstanceInfo] = {}
        self.decoders: list[InstanceInfo] = []
        self.prefills: list[InstanceInfo] = []
        self.decode_host: IntArray = np.zeros(0, dtype=np.int64)
        self.running: IntArray = np.zeros(0, dtype=np.int64)
        self.waiting: IntArray = np.zeros(0, dtype=np.int64)
        self.kv_use: FloatArray = np.zeros(0)
        self.capacity_tokens: FloatArray = np.zeros(0)
        self.default_capacity_tokens = capacity_tokens
        self.version = 0  # bumped when the decoder set changes
        # bumped whenever a decoder's kv_use or capacity_tokens may have changed (the arrays
        # are written only by set_load, or replaced when the decoder set changes)
        self.load_version = 0
        for inst in topology.instances:
            self._add(inst.name, inst.role, inst.host, source="topology")

    def _add(self, name: str, role: Role, host: str, source: str) -> InstanceInfo:
        host_index = self.topology.host_id(host)
        group = self.decoders if role == "decode" else self.prefills
        info = InstanceInfo(name, role, host, host_index, len(group), source=source)
        group.append(info)
        self.by_name[name] = info
        if role == "decode":
            self.decode_host = np.append(self.decode_host, host_index)
            self.running = np.append(self.running, 0)
            self.waiting = np.append(self.waiting, 0)
            self.kv_use = np.append(self.kv_use, 0.0)
            self.capacity_tokens = np.append(self.capacity_tokens,
                                             self.default_capacity_tokens)
            self.version += 1
            self.load_version += 1
        return info

    def get(self, name: str, where: str) -> InstanceInfo:
        try:
            return self.by_name[name]
        except KeyError:
            raise InputError(where, f"unknown instance {name!r}") from None

    def register(self, name: str, role: Role | None, host: str | None, load: Load | None,
                 metrics_url: str | None) -> InstanceInfo:
        """Add an instance on a known host, or refresh a known one's load and scrape URL."""
        info = self.by_name.get(name)
        if metrics_url is not None:
            where = info.host if info is not None else host
            if where is not None and where in self.topology.host_index:
                self.check_metrics_url(self.topology.host_id(where), metrics_url)
        if info is None:
            if role is None or host is None:
                raise InputError("body.role" if role is None else "body.host",
                                 f"required to register the new instance {name!r}")
            if host not in self.topology.host_index:
                raise InputError("body.host", f"unknown host {host!r} (not in the topology)")
            if self.registered >= self.max_registered:
                raise RegistryFullError("body.name", f"{self.max_registered} instances are "
                                        "registered already (the cap); remove or let expire")
            info = self._add(name, role, host, source="registered")
            self.registered += 1
        else:
            if role is not None and role != info.role:
                raise InputError("body.role", f"{name!r} is a {info.role} instance")
            if host is not None and host != info.host:
                raise InputError("body.host", f"{name!r} is on host {info.host!r}")
        if info.source == "registered":
            info.expires_ts = self.clock() + self.ttl_s
        if metrics_url is not None:
            info.metrics_url = metrics_url
        if load is not None:
            self.set_load(info, load)
        return info

    def check_metrics_url(self, host_index: int, url: str) -> None:
        """A scrape may only go to the instance's own host (its name or topology address)
        or to an allow-listed host: the scheduler must not fetch arbitrary URLs for anyone
        who can register (a server-side request forgery)."""
        try:
            parts = urlsplit(url)
            hostname = parts.hostname
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise InputError("body.metrics_url", "not a valid URL") from None
        if parts.scheme not in ("http", "https") or not hostname:
            raise InputError("body.metrics_url", "must be an http(s) URL with a host")
        if parts.username or parts.password:
            raise InputError("body.metrics_url", "must not carry credentials")
        host = self.topology.hosts[host_index]
        own = {host.name.lower()} | ({host.address.lower()} if host.address else set())
        if hostname.lower() not in own and hostname.lower() not in self.scrape_allow:
            raise InputError("body.metrics_url", f"host {hostname[:64]!r} is not the "
                             f"instance's host ({', '.join(sorted(own))}) nor allow-listed "
                             "(scheduler.scrape_allow)")

    def expired(self, now: float | None = None) -> list[str]:
        """Registered instances past their expiry."""
        now = self.clock() if now is None else now
        return [i.name for i in self.by_name.values()
                if i.expires_ts is not None and i.expires_ts <= now]

    def remove(self, names: Collection[str]) -> IntArray | None:
        """Drop registered instances. Returns, when decoders went, the map from old decoder
        index to new (-1: removed); None when the decoder set is unchanged."""
        gone = {n for n in names if n in self.by_name}
        for name in gone:
            if self.by_name[name].source != "registered":
                raise InputError("name", f"{name!r} comes from the topology file; only "
                                 "registered instances can be removed")
        if not gone:
            return None
        for name in gone:
            del self.by_name[name]
            self.registered -= 1
        self.prefills = [p for p in self.prefills if p.name not in gone]
        for i, p in enumerate(self.prefills):
            p.index = i
        keep = np.array([d.name not in gone for d in self.decoders], dtype=bool)
        if keep.all():
            return None
        mapping = np.full(len(self.decoders), -1, dtype=np.int64)
        mapping[keep] = np.arange(int(keep.sum()))
        self.decoders = [d for d in self.decoders if d.name not in gone]
        for i, d in enumerate(self.decoders):
            d.index = i
        for name in ("decode_host", "running", "waiting", "kv_use", "capacity_tokens"):
            setattr(self, name, getattr(self, name)[keep])
        self.version += 1
        self.load_version += 1
        return mapping

    def set_load(self, info: InstanceInfo, load: Load, now: float | None = None) -> None:
        info.updated_ts = self.clock() if now is None else now
        if info.role == "decode":
            self.load_version += 1
            self.running[info.index] = round(load.running)
            self.waiting[info.index] = round(load.waiting)
            self.kv_use[info.index] = load.kv_use
            if load.capacity_tokens is not None:
                self.capacity_tokens[info.index] = load.capacity_tokens

    def load_of(self, info: InstanceInfo) -> Load:
        if info.role != "decode":
            return Load()
        i = info.index
        return Load(float(self.running[i]), float(self.waiting[i]), float(self.kv_use[i]),
                    float(self.capacity_tokens[i]))
