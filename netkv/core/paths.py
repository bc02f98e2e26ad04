"""Per-source path tables for the hot path of a decision.

``Topology.path_matrix`` builds a source's paths on every call; a decision needs them for the
same source and candidate hosts again and again. A :class:`PathTable` computes, once per
source host, the six link columns to every host, laid out columns-first ``(6, hosts)`` so
that gathering candidates gives six contiguous rows and reductions run along axis 0 (numpy is
slow reducing a short inner axis). Off-path slots repeat the path's first link: a min or max
over a path is unchanged by a duplicate, so no mask is needed; sums use ``on_path``.
"""

from __future__ import annotations

import numpy as np

from netkv.core.costmodel import CostEstimate, LinkStateOracle
from netkv.core.topology import FloatArray, IntArray, Topology


class SourcePaths:
    """Paths from one source host to every host."""

    __slots__ = ("latency", "latency_of", "links", "on_path", "tiers")

    def __init__(self, topology: Topology, src: int) -> None:
        every = np.arange(topology.n_hosts, dtype=np.int64)
        tiers, links, mask = topology.path_matrix(src, every)
        first = links[:, :1]
        self.links: IntArray = np.ascontiguousarray(np.where(mask, links, first).T)
        self.on_path: FloatArray = np.ascontiguousarray(mask.T.astype(np.float64))
        self.tiers: IntArray = tiers
        self.latency_of: FloatArray = np.empty(0)
        self.latency: FloatArray = np.empty(0)

    def path_latency(self, latency_s: FloatArray) -> FloatArray:
        """Per-host path latency for the per-link ``latency_s`` (recomputed if it changed)."""
        if self.latency_of.shape != latency_s.shape or not np.array_equal(self.latency_of,
                                                                          latency_s):
            self.latency_of = latency_s.copy()
            self.latency = (latency_s[self.links] * self.on_path).sum(axis=0)
        return self.latency


class PathTable:
    """Lazily built :class:`SourcePaths` per source host for one topology."""

    __slots__ = ("_by_src", "_stacks", "topology")

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._by_src: dict[int, SourcePaths] = {}
        self._stacks: dict[bytes, tuple[IntArray, FloatArray, IntArray]] = {}

    def stacked(self, srcs: IntArray) -> tuple[IntArray, FloatArray, IntArray]:
        """``links (S, 6, hosts)``, ``on_path (S, 6, hosts)`` and ``tiers (S, hosts)`` for
        several sources at once (the joint policy's prefill hosts), cached per source set."""
        key = srcs.tobytes()
        hit = self._stacks.get(key)
        if hit is None:
            rows = [self.from_src(int(s)) for s in srcs]
            hit = (np.stack([r.links for r in rows]), np.stack([r.on_path for r in rows]),
                   np.stack([r.tiers for r in rows]))
            if len(self._stacks) > 16:
                self._stacks.clear()
            self._stacks[key] = hit
        return hit

    def from_src(self, src: int) -> SourcePaths:
        hit = self._by_src.get(src)
        if hit is None:
            hit = SourcePaths(self.topology, src)
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


def link_state_paths(oracle: LinkStateOracle, src: int,
                     dsts: IntArray | None = None) -> CostEstimate:
    """Zero-byte ``oracle.estimate(src, dsts, 0)`` (every host if ``dsts`` is None), reduced
    over the cached path table instead of a fresh ``(n, 6)`` path matrix."""
    paths = path_table(oracle.topology).from_src(src)
    links, on_path, tiers = paths.links, paths.on_path, paths.tiers
    if dsts is not None:
        links = np.take(links, dsts, axis=1)
        on_path = np.take(on_path, dsts, axis=1)
        tiers = tiers[dsts]
    bandwidth = np.maximum(oracle.available_bytes_s[links].min(axis=0), 1.0)
    latency = (oracle.latency_s[links] * on_path).sum(axis=0)
    age = oracle.age_s[links].max(axis=0)
    confidence = oracle.confidence[links].min(axis=0)
    return CostEstimate(latency.copy(), latency, bandwidth, tiers, age, confidence)


def pick(row: CostEstimate, dsts: IntArray, nbytes: FloatArray | float) -> CostEstimate:
    """The estimate for ``dsts`` and ``nbytes`` from a zero-byte row to every host (every
    oracle predicts ``latency + bytes / bandwidth``, so the row answers any byte count)."""
    latency = row.latency_s[dsts]
    bandwidth = row.bandwidth_bytes_s[dsts]
    seconds = latency + np.asarray(nbytes, dtype=np.float64) / bandwidth
    return CostEstimate(seconds, latency, bandwidth, row.tier[dsts], row.age_s[dsts],
                        row.confidence[dsts])


class CachedOracle:
    """Per-source rows of a fixed :class:`LinkStateOracle` (e.g. the tier prior), each
    computed once, so a decision costs O(|D|) numpy."""

    def __init__(self, base: LinkStateOracle) -> None:
        self.base = base
        self.topology = base.topology
        self.available_bytes_s = base.available_bytes_s  # per-link view, for bookings
        self._rows: dict[int, CostEstimate] = {}

    def row(self, src: int) -> CostEstimate:
        hit = self._rows.get(src)
        if hit is None:
            hit = self._rows[src] = link_state_paths(self.base, src)
        return hit

    def row_and_rate(self, src: int) -> tuple[CostEstimate, FloatArray]:
        """:meth:`row` and :attr:`available_bytes_s` together (as the map's cached view)."""
        return self.row(src), self.available_bytes_s

    def estimate(self, src: int, dsts: IntArray, nbytes: FloatArray | float) -> CostEstimate:
        return pick(self.row(src), dsts, nbytes)
