"""Hosts, instances and the links between them, with O(1) paths and tiers.

The fabric is a four-tier fat-tree as seen by one KV transfer:

* tier 0, same host: the transfer stays on the host's NVLink/PCIe fabric;
* tier 1, same leaf (ToR): source NIC up, destination NIC down;
* tier 2, same pod: plus the source leaf's uplink bundle and the destination leaf's downlink;
* tier 3, across the core: plus the source pod's and the destination pod's core links.

Every cable is full duplex, so each is two *directed* links (``up`` and ``down``). The uplinks
of one leaf to its spines are modelled as one bundle whose capacity is the sum of its members
(ECMP spreads flows over them); oversubscription is the ratio of downlink to uplink capacity.
Paths are therefore fixed per (source, destination) and composed from per-host chains,
which keeps every query O(1) per destination and vectorisable over destinations.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from netkv.errors import InputError
from netkv.fields import bound

Role = Literal["prefill", "decode"]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


class Tier(enum.IntEnum):
    """How far apart two hosts are; higher means more shared, scarcer links on the way."""

    SAME_HOST = 0
    SAME_LEAF = 1
    SAME_POD = 2
    CROSS_CORE = 3


class LinkKind(enum.StrEnum):
    """What a directed link is; decides who may report on it and how it is named."""

    HOST_FABRIC = "host_fabric"  # NVLink / PCIe inside one host (tier 0 transfers)
    NIC_UP = "nic_up"  # host -> leaf (host transmit)
    NIC_DOWN = "nic_down"  # leaf -> host (host receive)
    LEAF_UP = "leaf_up"  # leaf -> pod spines (bundle)
    LEAF_DOWN = "leaf_down"  # pod spines -> leaf
    POD_UP = "pod_up"  # pod -> core (bundle)
    POD_DOWN = "pod_down"  # core -> pod


# Which of the six path columns [up0, up1, up2, down2, down1, down0] a tier uses.
_PATH_MASK: BoolArray = np.array(
    [
        [True, False, False, False, False, False],  # same host: the host fabric only
        [True, False, False, False, False, True],  # same leaf: NIC up, NIC down
        [True, True, False, False, True, True],  # same pod: plus leaf bundle up and down
        [True, True, True, True, True, True],  # across the core: plus pod bundle up and down
    ],
    dtype=np.bool_,
)


@dataclass(frozen=True, slots=True)
class Host:
    """A GPU server."""

    name: str
    leaf: str
    pod: str
    gpus: int = 8
    address: str | None = None


@dataclass(frozen=True, slots=True)
class Instance:
    """An inference engine instance (one model replica) placed on one host."""

    name: str
    role: Role
    host: str
    gpus: int = 1


@dataclass(frozen=True, slots=True)
class Link:
    """A directed link with its capacity (bytes/s) and one-way base latency (s).

    ``owner`` is the host, leaf or pod whose agent may report on the link.
    """

    name: str
    kind: LinkKind
    owner: str
    capacity_bytes_s: float
    latency_s: float


@dataclass(frozen=True)
class Topology:
    """The placed cluster. Build it with :func:`build_topology` or the topology-file loader."""

    hosts: tuple[Host, ...]
    instances: tuple[Instance, ...]
    links: tuple[Link, ...]
    host_index: dict[str, int] = field(repr=False)
    link_index: dict[str, int] = field(repr=False)
    instance_index: dict[str, int] = field(repr=False)
    host_leaf: IntArray = field(repr=False)  # leaf number per host
    host_pod: IntArray = field(repr=False)  # pod number per host
    up_chain: IntArray = field(repr=False)  # (hosts, 3): nic_up, leaf_up, pod_up link indices
    down_chain: IntArray = field(repr=False)  # (hosts, 3): nic_down, leaf_down, pod_down
    fabric_link: IntArray = field(repr=False)  # (hosts,): the host-fabric link
    capacity: FloatArray = field(repr=False)  # (links,) bytes/s
    latency: FloatArray = field(repr=False)  # (links,) seconds
    instance_host: IntArray = field(repr=False)  # (instances,) host index

    # -- lookups ---------------------------------------------------------------------------
    def host_id(self, name: str) -> int:
        """Index of a host by name; unknown names are input errors."""
        try:
            return self.host_index[name]
        except KeyError:
            raise InputError("host", f"unknown host {name!r}") from None

    def instance(self, name: str) -> Instance:
        """An instance by name; unknown names are input errors."""
        try:
            return self.instances[self.instance_index[name]]
        except KeyError:
            raise InputError("instance", f"unknown instance {name!r}") from None

    def instances_with_role(self, role: Role) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances if i.role == role)

    # -- tiers and paths -------------------------------------------------------------------
    def tiers(self, src: int, dsts: IntArray) -> IntArray:
        """Tier from host ``src`` to each host in ``dsts`` (vectorised)."""
        same_pod = self.host_pod[dsts] == self.host_pod[src]
        same_leaf = self.host_leaf[dsts] == self.host_leaf[src]
        same_host = dsts == src
        tiers = np.full(dsts.shape, int(Tier.CROSS_CORE), dtype=np.int64)
        tiers[same_pod] = int(Tier.SAME_POD)
        tiers[same_leaf] = int(Tier.SAME_LEAF)
        tiers[same_host] = int(Tier.SAME_HOST)
        return tiers

    def tier(self, src: int, dst: int) -> Tier:
        return Tier(int(self.tiers(src, np.array([dst]))[0]))

    def path(self, src: int, dst: int) -> tuple[int, ...]:
        """Directed links a transfer from ``src`` to ``dst`` crosses, in order."""
        tier = self.tier(src, dst)
        if tier == Tier.SAME_HOST:
            return (int(self.fabric_link[src]),)
        ups = self.up_chain[src, :tier]
        downs = self.down_chain[dst, :tier][::-1]
        return tuple(int(x) for x in np.concatenate([ups, downs]))

    def path_matrix(self, src: int, dsts: IntArray) -> tuple[IntArray, IntArray, BoolArray]:
        """Vectorised paths from ``src`` to every host in ``dsts``.

        Returns ``(tiers, links, mask)``: ``links`` is (n, 6) link indices laid out as
        ``[up0, up1, up2, down2, down1, down0]`` and ``mask`` marks the ones on the path.
        Oracles reduce per-link arrays over it (min of bandwidth, sum of latency, ...).
        """
        tiers = self.tiers(src, dsts)
        links = np.empty((dsts.shape[0], 6), dtype=np.int64)
        links[:, 0:3] = self.up_chain[src]
        links[:, 3:6] = self.down_chain[dsts][:, ::-1]
        links[tiers == int(Tier.SAME_HOST), 0] = self.fabric_link[src]
        return tiers, links, _PATH_MASK[tiers]

    def nominal_share(self) -> FloatArray:
        """Per-link bandwidth each host can count on when every host sends at once.

        A NIC belongs to one host; a leaf bundle is shared by the hosts of its leaf and a pod
        bundle by the hosts of its pod. This is the *prior* for a link with no fresh telemetry:
        what a static rack/zone label can promise, never the idle ("healthy") rate.
        """
        sharers = np.ones(self.n_links, dtype=np.float64)
        leaf_hosts = np.bincount(self.host_leaf)
        pod_hosts = np.bincount(self.host_pod)
        for h in range(self.n_hosts):
            shared = ((1, leaf_hosts[self.host_leaf[h]]), (2, pod_hosts[self.host_pod[h]]))
            for col, count in shared:
                sharers[self.up_chain[h, col]] = count
                sharers[self.down_chain[h, col]] = count
        share: FloatArray = self.capacity / sharers
        return share

    def path_latency(self, src: int, dst: int) -> float:
        return float(self.latency[list(self.path(src, dst))].sum())

    @property
    def n_hosts(self) -> int:
        return len(self.hosts)

    @property
    def n_links(self) -> int:
        return len(self.links)


@dataclass(frozen=True, slots=True)
class FabricSpec:
    """Link rates and latencies that turn a host/leaf/pod layout into links.

    Rates are in Gb/s as operators quote them. ``leaf_oversubscription`` is host-facing
    capacity over spine-facing capacity at a leaf; ``pod_oversubscription`` the same at a pod.
    """

    nic_gbps: float = field(default=400.0, metadata=bound(gt=0))
    host_fabric_gbps: float = field(default=3600.0, metadata=bound(gt=0))
    leaf_oversubscription: float = field(default=1.0, metadata=bound(ge=1))
    pod_oversubscription: float = field(default=1.0, metadata=bound(ge=1))
    nic_latency_s: float = field(default=2e-6, metadata=bound(ge=0))
    leaf_latency_s: float = field(default=2e-6, metadata=bound(ge=0))
    pod_latency_s: float = field(default=3e-6, metadata=bound(ge=0))
    host_fabric_latency_s: float = field(default=1e-6, metadata=bound(ge=0))


def _gbps(rate: float) -> float:
    return rate * 1e9 / 8.0


def _index_hosts(
    hosts: list[Host] | tuple[Host, ...],
) -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, str]]:
    """Host, leaf and pod indices and each leaf's pod; rejects duplicate hosts and a leaf
    claimed by two pods."""
    if not hosts:
        raise InputError("hosts", "at least one host is required")
    host_index: dict[str, int] = {}
    for i, h in enumerate(hosts):
        if h.name in host_index:
            raise InputError(f"hosts[{i}].name", f"duplicate host {h.name!r}")
        host_index[h.name] = i
    leaves: dict[str, int] = {}
    pods: dict[str, int] = {}
    leaf_pod: dict[str, str] = {}
    for i, h in enumerate(hosts):
        if leaf_pod.setdefault(h.leaf, h.pod) != h.pod:
            raise InputError(f"hosts[{i}].pod", f"leaf {h.leaf!r} is already in pod "
                             f"{leaf_pod[h.leaf]!r}; a leaf belongs to one pod")
        leaves.setdefault(h.leaf, len(leaves))
        pods.setdefault(h.pod, len(pods))
    return host_index, leaves, pods, leaf_pod


def _index_instances(
    instances: list[Instance] | tuple[Instance, ...], host_index: dict[str, int],
) -> tuple[dict[str, int], IntArray]:
    """Instance indices and each instance's host; rejects duplicates, unknown hosts, bad roles."""
    instance_index: dict[str, int] = {}
    instance_host = np.zeros(len(instances), dtype=np.int64)
    for i, inst in enumerate(instances):
        where = f"instances[{i}]"
        if inst.name in instance_index:
            raise InputError(f"{where}.name", f"duplicate instance {inst.name!r}")
        if inst.host not in host_index:
            raise InputError(f"{where}.host", f"unknown host {inst.host!r}")
        if inst.role not in ("prefill", "decode"):
            raise InputError(f"{where}.role", f"must be 'prefill' or 'decode', got {inst.role!r}")
        instance_index[inst.name] = i
        instance_host[i] = host_index[inst.host]
    return instance_index, instance_host


@dataclass
class _LinkLayout:
    """The directed links of one fabric and each host's chains into them, built in order:
    leaf bundles, pod bundles, then each host's fabric and NIC links."""

    links: list[Link] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, kind: LinkKind, owner: str, gbps: float, latency: float) -> int:
        self.index[name] = len(self.links)
        self.links.append(Link(name, kind, owner, _gbps(gbps), latency))
        return self.index[name]

    def bundles(self, kinds: tuple[LinkKind, LinkKind], down_gbps: dict[str, float],
                oversubscription: float, latency: float) -> dict[str, tuple[int, int]]:
        """An up and a down bundle per leaf (or pod), sized by its host-facing capacity."""
        out: dict[str, tuple[int, int]] = {}
        for name, rate in down_gbps.items():
            uplink = rate / oversubscription
            out[name] = (self.add(f"{name}/up", kinds[0], name, uplink, latency),
                         self.add(f"{name}/down", kinds[1], name, uplink, latency))
        return out


def _bundle_rates(hosts: list[Host] | tuple[Host, ...], fabric: FabricSpec,
                  nic_rates: dict[str, float], leaf_pod: dict[str, str],
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """Host-facing capacity (Gb/s) of each leaf and of each pod."""
    leaf_down_gbps: dict[str, float] = {}
    for h in hosts:
        leaf_down_gbps[h.leaf] = leaf_down_gbps.get(h.leaf, 0.0) + nic_rates.get(
            h.name, fabric.nic_gbps)
    pod_down_gbps: dict[str, float] = {}
    for leaf, rate in leaf_down_gbps.items():
        pod = leaf_pod[leaf]
        pod_down_gbps[pod] = pod_down_gbps.get(pod, 0.0) + rate / fabric.leaf_oversubscription
    return leaf_down_gbps, pod_down_gbps


def build_topology(
    hosts: list[Host] | tuple[Host, ...],
    instances: list[Instance] | tuple[Instance, ...],
    fabric: FabricSpec,
    *,
    nic_gbps_by_host: dict[str, float] | None = None,
) -> Topology:
    """Lay out links for ``hosts`` and index everything; validates names and references."""
    host_index, leaves, pods, leaf_pod = _index_hosts(hosts)
    nic_rates = nic_gbps_by_host or {}
    leaf_down_gbps, pod_down_gbps = _bundle_rates(hosts, fabric, nic_rates, leaf_pod)

    layout = _LinkLayout()
    leaf_links = layout.bundles((LinkKind.LEAF_UP, LinkKind.LEAF_DOWN), leaf_down_gbps,
                                fabric.leaf_oversubscription, fabric.leaf_latency_s)
    pod_links = layout.bundles((LinkKind.POD_UP, LinkKind.POD_DOWN), pod_down_gbps,
                               fabric.pod_oversubscription, fabric.pod_latency_s)
    add = layout.add
    n = len(hosts)
    up = np.zeros((n, 3), dtype=np.int64)
    down = np.zeros((n, 3), dtype=np.int64)
    fabric_link = np.zeros(n, dtype=np.int64)
    for i, h in enumerate(hosts):
        rate = nic_rates.get(h.name, fabric.nic_gbps)
        fabric_link[i] = add(f"{h.name}/fabric", LinkKind.HOST_FABRIC, h.name,
                             fabric.host_fabric_gbps, fabric.host_fabric_latency_s)
        up[i] = (add(f"{h.name}/nic/up", LinkKind.NIC_UP, h.name, rate, fabric.nic_latency_s),
                 leaf_links[h.leaf][0], pod_links[h.pod][0])
        down[i] = (add(f"{h.name}/nic/down", LinkKind.NIC_DOWN, h.name, rate,
                       fabric.nic_latency_s),
                   leaf_links[h.leaf][1], pod_links[h.pod][1])

    instance_index, instance_host = _index_instances(instances, host_index)
    links = layout.links
    return Topology(
        hosts=tuple(hosts),
        instances=tuple(instances),
        links=tuple(links),
        host_index=host_index,
        link_index=layout.index,
        instance_index=instance_index,
        host_leaf=np.array([leaves[h.leaf] for h in hosts], dtype=np.int64),
        host_pod=np.array([pods[h.pod] for h in hosts], dtype=np.int64),
        up_chain=up,
        down_chain=down,
        fabric_link=fabric_link,
        capacity=np.array([lk.capacity_bytes_s for lk in links], dtype=np.float64),
        latency=np.array([lk.latency_s for lk in links], dtype=np.float64),
        instance_host=instance_host,
    )
