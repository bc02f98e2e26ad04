"""Boolean RTT tomography: attribute RTT inflation to shared links that no counter measures.

A link's queueing delay is at most the smallest inflation (smoothed minus minimum RTT) among
fresh probed pairs whose path crosses it, so an uninflated pair clears every link it crosses.
Links whose bound exceeds ``threshold_s`` get that delay and are marked saturated with
:data:`~netkv.core.congestion.INFERRED_CONFIDENCE`. Cost: O(probed pairs * path length).
"""

from __future__ import annotations

import numpy as np

from netkv.core.congestion import COUNTER_CONFIDENCE, INFERRED_CONFIDENCE, CongestionMap
from netkv.core.topology import LinkKind

INFERRED_KINDS = frozenset({LinkKind.LEAF_UP, LinkKind.LEAF_DOWN, LinkKind.POD_UP,
                            LinkKind.POD_DOWN})


def localise_inflation(cmap: CongestionMap, now: float | None = None,
                       threshold_s: float = 1e-3) -> int:
    """Mark the leaf and pod links that RTT inflation points to (see the module docstring);
    returns how many were marked saturated."""
    now = cmap.clock() if now is None else now
    counted = cmap.link_confidence(now) >= COUNTER_CONFIDENCE * 0.5
    counted &= cmap.source_confidence >= COUNTER_CONFIDENCE
    bound_s = np.full(cmap.topology.n_links, np.inf)
    fresh = [(a, b, max(p.srtt_s - p.min_s, 0.0)) for (a, b), p in cmap.pairs.items()
             if a != b and now - p.ts <= cmap.params.fresh_s]
    if fresh:
        ends = np.array([(a, b) for a, b, _ in fresh], dtype=np.int64)
        inflation = np.array([x for _, _, x in fresh])
        # Both directions: RTT crosses the forward and the reverse path.
        for src_col, dst_col in ((0, 1), (1, 0)):
            for src in np.unique(ends[:, src_col]).tolist():
                rows = ends[:, src_col] == src
                _, links, mask = cmap.topology.path_matrix(src, ends[rows, dst_col])
                values = np.broadcast_to(inflation[rows][:, None], links.shape)
                np.minimum.at(bound_s, links[mask], values[mask])
    found = 0
    for i, link in enumerate(cmap.topology.links):
        if link.kind not in INFERRED_KINDS or counted[i] or not np.isfinite(bound_s[i]):
            continue
        if bound_s[i] > threshold_s:
            cmap.observe_link(i, cmap.capacity[i], now, queue_s=float(bound_s[i]),
                              confidence=INFERRED_CONFIDENCE)
            found += 1
        elif cmap.source_confidence[i] <= INFERRED_CONFIDENCE:
            cmap.observe_link(i, 0.0, now, queue_s=0.0, confidence=INFERRED_CONFIDENCE)
    return found
