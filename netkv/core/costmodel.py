"""The network cost oracle: predicted KV-transfer time from one host to many.

This is the paper's "thin operator-to-scheduler interface". Every implementation answers the
same vectorised question, so the scheduler service, the simulator and the testbeds can swap a
static tier table, the simulator's ground truth, a delayed noisy telemetry view and the live
congestion map without touching a policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from netkv.core.topology import FloatArray, IntArray, Topology


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """Per destination: predicted seconds to move the bytes, and how much to trust it.

    ``age_s`` is how old the oldest measurement on the path is (``inf`` for a prior);
    ``confidence`` is in [0, 1] (0 means the number is the tier prior alone).
    """

    seconds: FloatArray
    latency_s: FloatArray
    bandwidth_bytes_s: FloatArray
    tier: IntArray
    age_s: FloatArray
    confidence: FloatArray


@runtime_checkable
class CostOracle(Protocol):
    """Predicts transfer time from host ``src`` to each host in ``dsts``."""

    def estimate(self, src: int, dsts: IntArray, nbytes: FloatArray | float) -> CostEstimate:
        """``nbytes`` is a scalar or one value per destination (delta transfers differ)."""
        ...


class LinkStateOracle:
    """An oracle over per-link state: path latency plus bytes over the path's bottleneck.

    The per-link arrays are owned by the caller and read at each call, so a simulator or a
    map consumer can update them in place; the oracle composes paths on demand, keeping the
    state O(hosts + links) rather than O(hosts squared).
    """

    def __init__(
        self,
        topology: Topology,
        available_bytes_s: FloatArray,
        latency_s: FloatArray,
        age_s: FloatArray | None = None,
        confidence: FloatArray | None = None,
    ) -> None:
        n = topology.n_links
        for name, arr in (("available_bytes_s", available_bytes_s), ("latency_s", latency_s)):
            if arr.shape != (n,):
                raise ValueError(f"{name} must have one value per link ({n}), got {arr.shape}")
        self.topology = topology
        self.available_bytes_s = available_bytes_s
        self.latency_s = latency_s
        self.age_s = age_s if age_s is not None else np.full(n, np.inf)
        self.confidence = confidence if confidence is not None else np.zeros(n)

    def estimate(self, src: int, dsts: IntArray, nbytes: FloatArray | float) -> CostEstimate:
        tiers, links, mask = self.topology.path_matrix(src, dsts)
        bandwidth = np.where(mask, self.available_bytes_s[links], np.inf).min(axis=1)
        bandwidth = np.maximum(bandwidth, 1.0)  # a dead link is very slow, never a division by 0
        latency = np.where(mask, self.latency_s[links], 0.0).sum(axis=1)
        age = np.where(mask, self.age_s[links], -np.inf).max(axis=1)
        confidence = np.where(mask, self.confidence[links], np.inf).min(axis=1)
        seconds = latency + np.asarray(nbytes, dtype=np.float64) / bandwidth
        return CostEstimate(seconds, latency, bandwidth, tiers, age, confidence)


def static_tier_oracle(topology: Topology) -> LinkStateOracle:
    """The prior: each path at its nominal full-load share, with no measurement behind it.

    This is what a static rack/zone label amounts to (llm-d's topology curve, Dynamo's
    per-domain QoS table): distance is known, congestion is not.
    """
    return LinkStateOracle(topology, topology.nominal_share(), topology.latency.copy())
