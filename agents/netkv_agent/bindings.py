"""Which links this agent may report on, and who it is: checked once, at start-up.

An agent's identity must be a node of the topology (a host, a leaf or a pod), and every
interface or RDMA port it binds must map to links that node owns (``resolve_links``); a
misconfigured agent is rejected with the setting that is wrong, before it opens a socket.
"""

from __future__ import annotations

from netkv.contracts.registration import LinkOwnershipError, LinkPair, resolve_links
from netkv.core.topology import Topology
from netkv.errors import InputError
from netkv_agent.settings import AgentSettings


def link_bindings(settings: AgentSettings, topology: Topology | None
                  ) -> tuple[dict[str, LinkPair], dict[str, LinkPair]]:
    """Interface -> links and RDMA port -> links, validated against the topology's owners.

    Hosts and switches register the same way: ``fabric_nic`` (a host's KV interface) binds
    ``<host>/nic/up|down``, ``uplink_nic`` (a switch's port to its parent) binds
    ``<switch>/up|down``, ``nic_links`` binds anything else explicitly.
    """
    me = settings.agent_id
    nics: dict[str, LinkPair] = {}
    rdma: dict[str, LinkPair] = {}
    origin: dict[tuple[str, str], str] = {}  # (table, name) -> setting, for error messages
    fabric = LinkPair(f"{me}/nic/up", f"{me}/nic/down")
    if settings.fabric_nic:
        nics[settings.fabric_nic] = fabric
        origin["nics", settings.fabric_nic] = "fabric_nic"
    if settings.uplink_nic:
        nics[settings.uplink_nic] = LinkPair(f"{me}/up", f"{me}/down")
        origin["nics", settings.uplink_nic] = "uplink_nic"
    if settings.rdma_fabric_port:
        rdma[settings.rdma_fabric_port] = fabric
        origin["rdma", settings.rdma_fabric_port] = "rdma_fabric_port"
    for name, binding in settings.nic_links.items():
        nics[name] = LinkPair(binding.tx, binding.rx)
        origin["nics", name] = f"nic_links.{name}"
    if topology is not None:
        for kind, table in (("nics", nics), ("rdma", rdma)):
            try:
                resolve_links(topology, me, table)
            except LinkOwnershipError as exc:
                raise InputError(origin[kind, exc.key], str(exc)) from None
    return nics, rdma


def check_identity(settings: AgentSettings, topology: Topology | None) -> None:
    """The agent id must be a topology node (host, leaf or pod) when a topology is given."""
    if topology is None:
        return
    nodes = set(topology.host_index)
    nodes |= {h.leaf for h in topology.hosts} | {h.pod for h in topology.hosts}
    if settings.agent_id not in nodes:
        raise InputError("agent_id", f"{settings.agent_id!r} is not a host, leaf or pod of the "
                         f"topology")
