"""A topology's hosts and switches built as network namespaces joined by shaped veths.

Layout (a tree of Linux bridges, so no loops and no routing to configure):

* one namespace per host, data interface ``eth0`` (198.18.0.0/16) to its leaf;
* one namespace per leaf, pod and (with more than one pod) the core, each a bridge ``br0``
  whose ports are veths: ``p<i>`` down to host/leaf/pod ``i``, ``uplink`` to the parent
  switch (the switch agent registers that port as its ``uplink_nic``: its transmit counters
  are ``<switch>/up``, its receive counters ``<switch>/down``, its tbf backlog the queue on
  ``<switch>/up``);
* one *tenant* namespace per switch (``t<switch>``): a server of another tenant attached to
  that leaf, pod or core switch by an unshaped veth. Background traffic runs between tenants
  of adjacent switches (leaf tenant -> pod tenant crosses exactly ``<leaf>/up``), so a hot spot
  congests exactly the switch link it names and no GPU host's NIC (which would penalise every
  policy alike);
* a control namespace (``ctl``) with a management bridge (198.19.0.0/24) that every host and
  switch namespace joins with an unshaped ``mgmt0``: Redis, Mosquitto, the oracle and the
  scheduler live there, out of band as in a real cluster.

Every directed link of the topology is a tbf on the egress of one veth end (see
:meth:`FabricPlan.link_port`). Rates are the topology's rates times ``scale`` (default
1e-4: a 400 Gb/s NIC becomes 40 Mb/s) and the KV bytes the engines move are scaled by the
same factor, so transfer times keep their real proportions (and their real magnitude).
Same-host transfers use the host namespace's loopback, shaped to the scaled host fabric.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from netkv.core.topology import Tier, Topology
from netkv.testbed.netns import Lab, Shaping

DATA_NET = ipaddress.IPv4Network("198.18.0.0/16")
MGMT_NET = ipaddress.IPv4Network("198.19.0.0/24")
CONTROL_ADDRESS = "198.19.0.1"
DEFAULT_SCALE = 1e-4
UPLINK = "uplink"  # a leaf's or pod's port toward its parent switch


@dataclass(frozen=True, slots=True)
class Port:
    """One veth end: the namespace it lives in and its name there."""

    ns: str
    ifname: str


@dataclass
class FabricPlan:
    """Where every host, switch and link of a topology goes; pure, so it is unit-testable."""

    topology: Topology
    run_prefix: str
    scale: float = DEFAULT_SCALE
    host_ns: dict[str, str] = field(default_factory=dict)
    host_addr: dict[str, str] = field(default_factory=dict)
    host_mgmt: dict[str, str] = field(default_factory=dict)
    mgmt_addr: dict[str, str] = field(default_factory=dict)  # ns -> management address
    switch_ns: dict[str, str] = field(default_factory=dict)  # leaf/pod/"core" -> ns
    tenant_ns: dict[str, str] = field(default_factory=dict)  # switch -> tenant ns
    tenant_addr: dict[str, str] = field(default_factory=dict)
    link_ports: dict[str, Port] = field(default_factory=dict)  # topology link -> egress port
    veths: list[tuple[Port, Port]] = field(default_factory=list)
    mgmt_ns: list[str] = field(default_factory=list)
    control_ns: str = ""

    @classmethod
    def of(cls, topology: Topology, run_prefix: str, scale: float = DEFAULT_SCALE) -> FabricPlan:
        plan = cls(topology, run_prefix, scale)
        plan._lay_out()
        return plan

    def _lay_out(self) -> None:
        t, p = self.topology, self.run_prefix
        self.control_ns = f"{p}ctl"
        leaves = list(dict.fromkeys(h.leaf for h in t.hosts))
        pods = list(dict.fromkeys(h.pod for h in t.hosts))
        leaf_pod = {h.leaf: h.pod for h in t.hosts}
        for leaf in leaves:
            self.switch_ns[leaf] = f"{p}{leaf}"
        for pod in pods:
            self.switch_ns[pod] = f"{p}{pod}"
        if len(pods) > 1:
            self.switch_ns["core"] = f"{p}core"
        data_hosts = DATA_NET.hosts()
        for _ in range(9):
            next(data_hosts)  # .0.1-.0.9 reserved
        for i, h in enumerate(t.hosts):
            ns = f"{p}{h.name}"
            self.host_ns[h.name] = ns
            self.host_addr[h.name] = str(next(data_hosts))
            leaf_port = Port(self.switch_ns[h.leaf], f"p{i}")
            self.veths.append((Port(ns, "eth0"), leaf_port))
            self.link_ports[f"{h.name}/nic/up"] = Port(ns, "eth0")
            self.link_ports[f"{h.name}/nic/down"] = leaf_port
        for i, leaf in enumerate(leaves):
            pod = leaf_pod[leaf]
            up = Port(self.switch_ns[leaf], UPLINK)
            down = Port(self.switch_ns[pod], f"p{i}")
            self.veths.append((up, down))
            self.link_ports[f"{leaf}/up"] = up
            self.link_ports[f"{leaf}/down"] = down
        if "core" in self.switch_ns:
            for i, pod in enumerate(pods):
                up = Port(self.switch_ns[pod], UPLINK)
                down = Port(self.switch_ns["core"], f"p{i}")
                self.veths.append((up, down))
                self.link_ports[f"{pod}/up"] = up
                self.link_ports[f"{pod}/down"] = down
        for switch, ns in self.switch_ns.items():
            tenant = f"{p}t{switch}"
            self.tenant_ns[switch] = tenant
            self.tenant_addr[switch] = str(next(data_hosts))
            self.veths.append((Port(tenant, "eth0"), Port(ns, "tenant")))
        self.mgmt_ns = [*self.host_ns.values(), *self.switch_ns.values()]
        if len(self.mgmt_ns) > MGMT_NET.num_addresses - 3:
            raise ValueError(f"too many namespaces for the management net {MGMT_NET}")
        for i, ns in enumerate(self.mgmt_ns):
            self.mgmt_addr[ns] = str(MGMT_NET.network_address + 2 + i)
        self.host_mgmt = {h: self.mgmt_addr[ns] for h, ns in self.host_ns.items()}

    # -- queries --------------------------------------------------------------------------
    def rate_bps(self, link: str) -> float:
        """The emulated rate of a topology link in bits/s (topology rate times scale)."""
        t = self.topology
        return float(t.capacity[t.link_index[link]]) * 8 * self.scale

    def link_port(self, link: str) -> Port:
        return self.link_ports[link]

    @property
    def namespaces(self) -> list[str]:
        return [self.control_ns, *self.switch_ns.values(), *self.host_ns.values(),
                *self.tenant_ns.values()]

    def parent(self, switch: str) -> str | None:
        """The switch above a leaf (its pod) or a pod (the core)."""
        for h in self.topology.hosts:
            if h.leaf == switch:
                return h.pod
            if h.pod == switch:
                return "core" if "core" in self.switch_ns else None
        return None

    def scaled_topology_data(self) -> dict[str, Any]:
        """The topology file the control plane reads: same hosts and instances, the
        emulated (scaled) rates, and the hosts' testbed addresses."""
        t = self.topology
        nic = float(t.capacity[t.link_index[f"{t.hosts[0].name}/nic/up"]]) * 8 / 1e9
        fabric_gbps = float(t.capacity[t.fabric_link[0]]) * 8 / 1e9
        leaf = t.hosts[0].leaf
        pod = t.hosts[0].pod
        leaf_hosts = sum(1 for h in t.hosts if h.leaf == leaf)
        leaf_up = float(t.capacity[t.link_index[f"{leaf}/up"]]) * 8 / 1e9
        leaf_os = nic * leaf_hosts / leaf_up
        pod_os = 1.0
        if f"{pod}/up" in t.link_index:
            pod_leaves = len({h.leaf for h in t.hosts if h.pod == pod})
            pod_up = float(t.capacity[t.link_index[f"{pod}/up"]]) * 8 / 1e9
            pod_os = leaf_up * pod_leaves / pod_up
        return {
            "fabric": {"nic_gbps": nic * self.scale,
                       "host_fabric_gbps": fabric_gbps * self.scale,
                       "leaf_oversubscription": round(leaf_os, 6),
                       "pod_oversubscription": round(max(pod_os, 1.0), 6)},
            "hosts": [{"name": h.name, "leaf": h.leaf, "pod": h.pod, "gpus": h.gpus,
                       "address": self.host_addr[h.name]} for h in t.hosts],
            "instances": [{"name": i.name, "role": i.role, "host": i.host, "gpus": i.gpus}
                          for i in t.instances],
        }

    def write_topology(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump(self.scaled_topology_data(), sort_keys=False))
        return path

    def crosses(self, src: str, dst: str, link: str) -> bool:
        """Does a transfer from host ``src`` to host ``dst`` cross topology link ``link``?"""
        t = self.topology
        s, d = t.host_id(src), t.host_id(dst)
        if t.tier(s, d) == Tier.SAME_HOST:
            return False
        return t.link_index[link] in t.path(s, d)

    def describe_scale(self) -> str:
        nic = self.rate_bps(f"{self.topology.hosts[0].name}/nic/up")
        return (f"scale {self.scale:g}: a {nic / self.scale / 1e9:g} Gb/s NIC is emulated at "
                f"{nic / 1e6:g} Mb/s and KV bytes are scaled by the same factor, so transfer "
                f"times keep their real values")


def build(lab: Lab, plan: FabricPlan) -> None:
    """Create the plan's namespaces, bridges, veths, addresses and tbf shapers in ``lab``."""
    short = len(lab.prefix)
    for ns in plan.namespaces:
        lab.add_namespace(ns[short:])
    for ns in [plan.control_ns, *plan.switch_ns.values()]:
        lab.add_bridge(ns)
    lab.add_bridge(plan.control_ns, "mgmt")
    lab.address(plan.control_ns, "mgmt", f"{CONTROL_ADDRESS}/{MGMT_NET.prefixlen}")
    for a, b in plan.veths:
        lab.add_veth(a.ns, a.ifname, b.ns, b.ifname)
        for end in (a, b):
            if end.ns in plan.switch_ns.values():
                lab.attach(end.ns, end.ifname)
    for name, ns in plan.host_ns.items():
        lab.address(ns, "eth0", f"{plan.host_addr[name]}/{DATA_NET.prefixlen}")
    for switch, ns in plan.tenant_ns.items():
        lab.address(ns, "eth0", f"{plan.tenant_addr[switch]}/{DATA_NET.prefixlen}")
    for i, ns in enumerate(plan.mgmt_ns):
        lab.add_veth(ns, "mgmt0", plan.control_ns, f"m{i}")
        lab.attach(plan.control_ns, f"m{i}", "mgmt")
        lab.address(ns, "mgmt0", f"{plan.mgmt_addr[ns]}/{MGMT_NET.prefixlen}")
    for link, port in plan.link_ports.items():
        lab.shape(port.ns, port.ifname, Shaping.for_rate(plan.rate_bps(link)))
    for h, ns in plan.host_ns.items():
        fabric = float(plan.topology.capacity[plan.topology.fabric_link[
            plan.topology.host_id(h)]]) * 8 * plan.scale
        lab.set_mtu(ns, "lo", 1500)
        lab.shape(ns, "lo", Shaping.for_rate(fabric))
