"""Whom an agent probes, and how often: dense inside its leaf, sparse and rotating beyond.

Pingmesh probes three complete graphs (servers under a ToR, ToR to ToR, DC to DC);
R-Pingmesh probes every RNIC under the ToR plus a sample of other ToRs. We do the same with
the fat-tree tiers:

* **same leaf** (tier 1): every registered host of the leaf, at ``probe_interval_leaf_s``;
  this is where a faulty NIC shows, and the leaf is small.
* **same pod** (tier 2): ``pod_fanout`` hosts of each other leaf of the pod, at
  ``probe_interval_pod_s``.
* **across the core** (tier 3): ``core_fanout`` hosts in total, spread over other pods first,
  at ``probe_interval_core_s``.

The sampled peers rotate every ``pinglist_rotate_s`` with a seed of (agent, epoch), so over
time every pair is covered and different agents sample different peers. An agent's probe
count is bounded by the leaf size, the leaves per pod and the fanouts, none of which grows
with the number of hosts: total probing grows linearly with hosts, not quadratically.
Peers are only probed once they are registered (their address and echo port are known).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Mapping

from netkv.core.topology import Topology
from netkv_agent.peerstate import PeerTarget
from netkv_agent.settings import AgentSettings

Endpoint = tuple[str, int]  # (address, echo port)


def _rng(me: str, epoch: int, salt: str) -> random.Random:
    return random.Random(zlib.crc32(f"{me}|{epoch}|{salt}".encode()))


def build_pinglist(settings: AgentSettings, topology: Topology | None,
                   endpoints: Mapping[str, Endpoint], now: float) -> list[PeerTarget]:
    """The pinglist for ``settings.agent_id`` at wall time ``now``.

    ``endpoints`` maps registered agents to their echo endpoint. Without a topology every
    registered peer is probed at the leaf interval (capped at ``max_peers``).
    """
    me = settings.agent_id
    epoch = int(now // settings.pinglist_rotate_s)
    others = {n: e for n, e in endpoints.items() if n != me and e[1] > 0}
    if topology is None:
        names = sorted(others)
        if len(names) > settings.max_peers:
            _rng(me, epoch, "all").shuffle(names)
            names = sorted(names[:settings.max_peers])
        return [PeerTarget(n, *others[n], settings.probe_interval_leaf_s) for n in names]
    if me not in topology.host_index:
        return []  # a switch agent (leaf/pod identity) reports counters only
    mine = topology.hosts[topology.host_index[me]]
    leaf_peers: list[str] = []
    pod_by_leaf: dict[str, list[str]] = {}
    core_by_pod: dict[str, list[str]] = {}
    for host in topology.hosts:
        if host.name not in others:
            continue
        if host.leaf == mine.leaf:
            leaf_peers.append(host.name)
        elif host.pod == mine.pod:
            pod_by_leaf.setdefault(host.leaf, []).append(host.name)
        else:
            core_by_pod.setdefault(host.pod, []).append(host.name)
    targets = [PeerTarget(n, *others[n], settings.probe_interval_leaf_s)
               for n in leaf_peers]
    for leaf, names in sorted(pod_by_leaf.items()):
        picked = _rng(me, epoch, leaf).sample(names, min(settings.pod_fanout, len(names)))
        targets += [PeerTarget(n, *others[n], settings.probe_interval_pod_s)
                    for n in sorted(picked)]
    # Across the core: shuffle inside each pod, then take round-robin over a shuffled pod
    # order, so that a small fanout still reaches as many distinct pods as possible.
    rng = _rng(me, epoch, "core")
    pods = sorted(core_by_pod)
    rng.shuffle(pods)
    queues = []
    for pod in pods:
        names = list(core_by_pod[pod])
        rng.shuffle(names)
        queues.append(names)
    core: list[str] = []
    depth = 0
    while len(core) < settings.core_fanout and any(depth < len(q) for q in queues):
        core += [q[depth] for q in queues if depth < len(q)]
        depth += 1
    targets += [PeerTarget(n, *others[n], settings.probe_interval_core_s)
                for n in sorted(core[:settings.core_fanout])]
    return targets[:settings.max_peers]
