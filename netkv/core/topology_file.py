"""Topology files (YAML or JSON): an explicit host list, or a parametric fat-tree.

Explicit form::

    fabric: {nic_gbps: 400, leaf_oversubscription: 1, pod_oversubscription: 3}
    hosts:
      - {name: gpu-a1, leaf: rack-a, pod: pod-1, gpus: 8, address: 10.0.0.11}
    instances:
      - {name: prefill-0, role: prefill, host: gpu-a1, gpus: 4}

Fat-tree form (hosts and instances are generated)::

    fabric: {...}
    fat_tree: {pods: 2, leaves_per_pod: 2, hosts_per_leaf: 2, gpus_per_host: 8,
               instance_gpus: 4, role_pattern: PD}
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

from netkv.core.topology import FabricSpec, Host, Instance, Role, Topology, build_topology
from netkv.errors import InputError
from netkv.fields import bound, from_mapping


@dataclass(frozen=True, slots=True)
class FatTreeSpec:
    """A regular fat-tree. Instances are laid out host by host, ``instance_gpus`` GPUs each,
    with roles taken in turn from ``role_pattern`` (``P`` prefill, ``D`` decode)."""

    pods: int = field(default=2, metadata=bound(ge=1))
    leaves_per_pod: int = field(default=2, metadata=bound(ge=1))
    hosts_per_leaf: int = field(default=2, metadata=bound(ge=1))
    gpus_per_host: int = field(default=8, metadata=bound(ge=1))
    instance_gpus: int = field(default=4, metadata=bound(ge=1))
    role_pattern: str = "PD"
    address_base: str | None = None  # first host's IPv4 address; the others follow

    def __post_init__(self) -> None:
        if not self.role_pattern or set(self.role_pattern) - {"P", "D"}:
            raise InputError("fat_tree.role_pattern", "must be a non-empty string of P and D")
        if self.gpus_per_host % self.instance_gpus:
            raise InputError("fat_tree.instance_gpus",
                             f"must divide gpus_per_host ({self.gpus_per_host})")
        if self.address_base is not None:
            try:
                ipaddress.IPv4Address(self.address_base)
            except ValueError:
                raise InputError("fat_tree.address_base",
                                 f"not an IPv4 address: {self.address_base!r}") from None

    def layout(self) -> tuple[list[Host], list[Instance]]:
        hosts: list[Host] = []
        instances: list[Instance] = []
        base = ipaddress.IPv4Address(self.address_base) if self.address_base else None
        per_host = self.gpus_per_host // self.instance_gpus
        k = 0
        for p in range(self.pods):
            for lf in range(self.leaves_per_pod):
                for _ in range(self.hosts_per_leaf):
                    name = f"h{len(hosts):03d}"
                    address = str(base + len(hosts)) if base else None
                    hosts.append(Host(name, f"leaf{p}.{lf}", f"pod{p}", self.gpus_per_host,
                                      address))
                    for g in range(per_host):
                        letter = self.role_pattern[k % len(self.role_pattern)]
                        role: Role = "prefill" if letter == "P" else "decode"
                        instances.append(Instance(f"{name}-{role[0]}{g}", role, name,
                                                  self.instance_gpus))
                        k += 1
        return hosts, instances


@dataclass(frozen=True, slots=True)
class HostEntry:
    name: str = field(metadata={"nonempty": True})
    leaf: str = field(metadata={"nonempty": True})
    pod: str = field(metadata={"nonempty": True})
    gpus: int = field(default=8, metadata=bound(ge=1))
    address: str | None = None
    nic_gbps: float | None = field(default=None, metadata=bound(gt=0))


@dataclass(frozen=True, slots=True)
class InstanceEntry:
    name: str = field(metadata={"nonempty": True})
    role: Literal["prefill", "decode"]
    host: str = field(metadata={"nonempty": True})
    gpus: int = field(default=1, metadata=bound(ge=1))


@dataclass(frozen=True, slots=True)
class TopologySpec:
    """The parsed topology file, before links are laid out."""

    fabric: FabricSpec = FabricSpec()
    fat_tree: FatTreeSpec | None = None
    hosts: tuple[HostEntry, ...] = ()
    instances: tuple[InstanceEntry, ...] = ()

    def build(self) -> Topology:
        if self.fat_tree is not None:
            if self.hosts or self.instances:
                raise InputError("fat_tree", "give either fat_tree or hosts/instances, not both")
            hosts, instances = self.fat_tree.layout()
            return build_topology(hosts, instances, self.fabric)
        if not self.hosts:
            raise InputError("hosts", "a topology needs hosts (or a fat_tree section)")
        hosts = [Host(h.name, h.leaf, h.pod, h.gpus, h.address) for h in self.hosts]
        nic = {h.name: h.nic_gbps for h in self.hosts if h.nic_gbps is not None}
        for i, h in enumerate(self.hosts):
            if h.address is not None:
                try:
                    ipaddress.ip_address(h.address)
                except ValueError:
                    raise InputError(f"hosts[{i}].address",
                                     f"not an IP address: {h.address!r}") from None
        instances = [Instance(i.name, i.role, i.host, i.gpus) for i in self.instances]
        return build_topology(hosts, instances, self.fabric, nic_gbps_by_host=nic)


def parse_topology(data: Any, where: str = "topology") -> Topology:
    """Build a topology from already-decoded data; errors are prefixed with ``where``."""
    try:
        return from_mapping(TopologySpec, data).build()
    except InputError as exc:
        raise InputError(f"{where}: {exc.where}", exc.message) from None
