"""Per-source path tables for the hot path of a decision.

``Topology.path_matrix`` builds a source's paths on every call; a decision needs them for the
same source and candidate hosts again and again. A :class:`PathTable` computes, once per
source host, the six link columns to every host with unused columns pointing at a sentinel
link ``n_links`` (rate ``inf``, latency 0, nothing booked), so per-link arrays extended by one
entry reduce over paths without masks.
"""

from __future__ import annotations

import numpy as np

from netkv.core.topology import IntArray, Topology


class PathTable:
    """Lazily built ``(links, tiers)`` per source host for one topology."""

    __slots__ = ("_by_src", "sentinel", "topology")

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.sentinel = topology.n_links
        self._by_src: dict[int, tuple[IntArray, IntArray]] = {}

    def from_src(self, src: int) -> tuple[IntArray, IntArray]:
        """``links (hosts, 6)`` with the sentinel off-path, and ``tiers (hosts,)``."""
        hit = self._by_src.get(src)
        if hit is None:
            every = np.arange(self.topology.n_hosts, dtype=np.int64)
            tiers, links, mask = self.topology.path_matrix(src, every)
            links = np.where(mask, links, self.sentinel)
            hit = (links, tiers)
            self._by_src[src] = hit
        return hit


_TABLES: dict[int, PathTable] = {}


def path_table(topology: Topology) -> PathTable:
    """The shared table for ``topology`` (kept while the topology object lives)."""
    table = _TABLES.get(id(topology))
    if table is None or table.topology is not topology:
        if len(_TABLES) > 64:
            _TABLES.clear()
        table = PathTable(topology)
        _TABLES[id(topology)] = table
    return table
