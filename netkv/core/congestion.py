"""The congestion map: live per-link and per-pair network state, O(hosts + links).

The oracle service feeds it measurements; the scheduler and the simulator read it through the
:class:`~netkv.core.oracle.CostOracle` protocol. Nothing here does I/O.

State (all arrays indexed like ``topology.links`` / ``topology.hosts``):

* per directed link: utilisation (bytes/s), capacity (bytes/s; the topology's unless an agent
  reported a link speed), queueing delay (s, from qdisc backlog or RTT tomography), the time
  of the last measurement and the confidence of its source (1 for counters, lower for
  inferred values);
* per probed host pair: smoothed RTT, min RTT, p99 and loss ratio (sparse: only the pairs the
  agents' pinglists probe, which grows about linearly with hosts);
* per host: when its agent was last heard from (liveness). Pairs involving a host whose
  agent went silent are ignored (the agent is the echo responder, so probe loss towards it
  says nothing about the network).

Pair estimates are composed on demand (never stored as an O(hosts²) matrix)::

    latency   = w * srtt/2 + (1-w) * sum(link latency + link queue)      (w = pair freshness)
    bandwidth = min over path links of  c * avail + (1-c) * prior         (c = link freshness)
    avail     = max(capacity - utilisation, capacity * min_share)
    seconds   = latency + bytes / (bandwidth * (1 - loss))

``prior`` is :meth:`Topology.nominal_share` (what each host can count on when every host
sends), so stale or missing data decays to the tier prior and is never reported as healthy
or idle. Freshness is 1 up to ``fresh_s`` after a measurement and falls linearly to 0 at
``stale_s`` (default: three publish intervals). ``min_share`` is the floor a new flow still
gets on a saturated link (TCP/DCQCN fair share against the flows already there).

API for consumers::

    cmap = CongestionMap(topology, params=MapParams(fresh_s=1, stale_s=3))
    cmap.observe_link(link, util_bytes_s, ts)         # producers (the oracle service)
    cmap.observe_rtt(src, dst, srtt_s=.., min_s=.., p99_s=.., loss=.., ts=..)
    cmap.estimate(src, dsts, nbytes)                  # CostOracle protocol -> CostEstimate
    cmap.cached(ttl_s)                                # the same, rows cached per source
    cmap.link_view(now)                               # a LinkStateOracle over the same state
    data = cmap.to_snapshot(version)                  # versioned msgpack bytes
    cmap2 = CongestionMap.from_snapshot(topology, data)   # strict; SnapshotError on bad data

The snapshot is a msgpack map with ``schema`` (:data:`SNAPSHOT_SCHEMA`), ``version`` (monotonic,
set by the publisher), ``created_ts`` (unix s), ``params``, ``links`` (parallel arrays keyed by
the ``name`` array, so a consumer maps them by link name, not by position), ``hosts`` and
``pairs``. Decoding rejects another schema, unknown or missing fields, unknown link/host names,
wrong lengths and non-finite or negative numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from netkv.core.oracle import CostEstimate, LinkStateOracle
from netkv.core.paths import link_state_paths, pick
from netkv.core.topology import FloatArray, IntArray, LinkKind, Topology
from netkv.fields import bound

SNAPSHOT_SCHEMA = 1
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024

# Source confidences: counters measure the link itself; tomography infers it from paths.
COUNTER_CONFIDENCE = 1.0
INFERRED_CONFIDENCE = 0.5


class SnapshotError(ValueError):
    """A snapshot that does not follow the schema; ``where`` names the field."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"snapshot.{where}: {message}")
        self.where = where


@dataclass(frozen=True, slots=True)
class MapParams:
    """How fast measurements age and how a saturated link is modelled."""

    fresh_s: float = field(default=1.0, metadata=bound(gt=0))
    stale_s: float = field(default=3.0, metadata=bound(gt=0))
    min_share: float = field(default=0.1, metadata=bound(gt=0, le=1))
    max_loss: float = field(default=0.9, metadata=bound(ge=0, lt=1))

    def __post_init__(self) -> None:
        if self.stale_s <= self.fresh_s:
            raise ValueError(f"stale_s ({self.stale_s}) must exceed fresh_s ({self.fresh_s})")

    def freshness(self, age_s: FloatArray) -> FloatArray:
        """1 while fresh, linearly down to 0 at ``stale_s``; 0 for never-measured (inf)."""
        span = self.stale_s - self.fresh_s
        weight: FloatArray = np.clip((self.stale_s - age_s) / span, 0.0, 1.0)
        return weight


@dataclass(slots=True)
class PairState:
    """Round-trip measurements between two hosts (undirected: RTT is symmetric)."""

    srtt_s: float
    min_s: float
    p99_s: float
    loss: float
    ts: float


def _pair_key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a <= b else (b, a)


class CongestionMap:
    """Live network state over one topology; implements the ``CostOracle`` protocol."""

    def __init__(self, topology: Topology, params: MapParams | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.topology = topology
        self.params = params or MapParams()
        self.clock = clock
        n = topology.n_links
        self.prior: FloatArray = topology.nominal_share()
        self.capacity: FloatArray = topology.capacity.copy()
        self.util: FloatArray = np.zeros(n)
        self.queue_s: FloatArray = np.zeros(n)
        self.updated_ts: FloatArray = np.zeros(n)  # 0 = never measured
        self.source_confidence: FloatArray = np.zeros(n)
        self.host_seen_ts: FloatArray = np.zeros(topology.n_hosts)
        # Written only through observe_rtt / from_snapshot, which keep ``_peers`` (each
        # host's probed peers, for vectorised pair corrections) in step.
        self.pairs: dict[tuple[int, int], PairState] = {}
        self._peers: dict[int, dict[int, PairState]] = {}
        self.generation = 0  # bumped by every observation; cached views re-read on change
        self.version = 0  # set by the publisher / from a snapshot
        self.created_ts = 0.0

    # -- producers ------------------------------------------------------------------------
    def observe_link(self, link: int, util_bytes_s: float, ts: float, *,
                     capacity_bytes_s: float | None = None, queue_s: float | None = None,
                     confidence: float = COUNTER_CONFIDENCE) -> None:
        """Record a link's utilisation measured over a window ending at ``ts``.

        Older measurements than the one held are ignored (streams may be read out of order
        across agents after a failover).
        """
        if ts < self.updated_ts[link]:
            return
        self.generation += 1
        self.util[link] = util_bytes_s
        if capacity_bytes_s:
            self.capacity[link] = capacity_bytes_s
        if queue_s is not None:
            self.queue_s[link] = queue_s
        self.updated_ts[link] = ts
        self.source_confidence[link] = confidence

    def observe_queue(self, link: int, queue_s: float, ts: float) -> None:
        """Queueing delay on a link (tc backlog / capacity); does not refresh utilisation."""
        if ts >= self.updated_ts[link] - self.params.stale_s:
            self.generation += 1
            self.queue_s[link] = queue_s

    def observe_rtt(self, src: int, dst: int, *, srtt_s: float, min_s: float, p99_s: float,
                    loss: float, ts: float) -> None:
        key = _pair_key(src, dst)
        old = self.pairs.get(key)
        if old is not None and ts < old.ts:
            return
        floor = min(min_s, old.min_s) if old is not None and old.min_s > 0 else min_s
        self._set_pair(key, PairState(srtt_s, floor, p99_s, loss, ts))

    def _set_pair(self, key: tuple[int, int], pair: PairState) -> None:
        self.generation += 1
        self.pairs[key] = pair
        a, b = key
        if a != b:  # a host's RTT to itself says nothing about the network
            self._peers.setdefault(a, {})[b] = pair
            self._peers.setdefault(b, {})[a] = pair

    def observe_host(self, host: int, ts: float) -> None:
        """The host's agent was heard from at ``ts`` (a batch or a heartbeat)."""
        self.generation += 1
        self.host_seen_ts[host] = max(self.host_seen_ts[host], ts)

    # -- derived state --------------------------------------------------------------------
    def link_age(self, now: float | None = None) -> FloatArray:
        now = self.clock() if now is None else now
        age: FloatArray = np.where(self.updated_ts > 0, np.maximum(now - self.updated_ts, 0.0),
                                   np.inf)
        return age

    def link_confidence(self, now: float | None = None,
                        age: FloatArray | None = None) -> FloatArray:
        age = self.link_age(now) if age is None else age
        conf: FloatArray = self.params.freshness(age) * self.source_confidence
        return conf

    def available(self, now: float | None = None,
                  conf: FloatArray | None = None) -> FloatArray:
        """Per-link bandwidth a new transfer can expect, blended with the prior by freshness."""
        conf = self.link_confidence(now) if conf is None else conf
        measured = np.maximum(self.capacity - self.util, self.capacity * self.params.min_share)
        blended: FloatArray = conf * measured + (1.0 - conf) * self.prior
        return blended

    def link_view(self, now: float | None = None) -> LinkStateOracle:
        """A plain :class:`LinkStateOracle` over the current state (no per-pair RTTs)."""
        age = self.link_age(now)
        conf = self.link_confidence(now, age)
        latency = self.topology.latency + conf * self.queue_s
        return LinkStateOracle(self.topology, self.available(now, conf), latency, age, conf)

    def hosts_alive(self, now: float | None = None) -> np.ndarray[Any, np.dtype[np.bool_]]:
        now = self.clock() if now is None else now
        alive: np.ndarray[Any, np.dtype[np.bool_]] = (
            (self.host_seen_ts > 0) & (now - self.host_seen_ts <= self.params.stale_s))
        return alive

    # -- CostOracle -----------------------------------------------------------------------
    def pair_terms(self, src: int, now: float | None = None
                   ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Per host: the weight of ``src``'s pair RTT (its freshness; 0 if unprobed, stale,
        the host itself or either agent silent), half the smoothed RTT and the capped loss.

        A host whose agent went silent answers no probes: its peers' RTT windows show loss
        that says nothing about the network, so its pairs count as unmeasured.
        """
        now = self.clock() if now is None else now
        n = self.topology.n_hosts
        weight, half_rtt, loss = np.zeros(n), np.zeros(n), np.zeros(n)
        peers = self._peers.get(src)
        if not peers:
            return weight, half_rtt, loss
        silent = (self.host_seen_ts > 0) & (now - self.host_seen_ts > self.params.stale_s)
        if silent[src]:
            return weight, half_rtt, loss
        dst = np.fromiter(peers.keys(), dtype=np.int64, count=len(peers))
        states = list(peers.values())
        ts = np.fromiter((p.ts for p in states), dtype=np.float64, count=len(states))
        w = self.params.freshness(now - ts)
        w[silent[dst]] = 0.0
        weight[dst] = w
        half_rtt[dst] = np.fromiter((p.srtt_s for p in states), dtype=np.float64,
                                    count=len(states)) / 2
        loss[dst] = np.minimum(np.fromiter((p.loss for p in states), dtype=np.float64,
                                           count=len(states)), self.params.max_loss)
        return weight, half_rtt, loss

    def estimate(self, src: int, dsts: IntArray, nbytes: FloatArray | float,
                 now: float | None = None) -> CostEstimate:
        now = self.clock() if now is None else now
        dsts = np.asarray(dsts, dtype=np.int64)
        base = link_state_paths(self.link_view(now), src, dsts)
        weight, half_rtt, loss = (x[dsts] for x in self.pair_terms(src, now))
        return _with_pairs(base, weight, half_rtt, loss, nbytes)

    def cached(self, ttl_s: float, clock: Callable[[], float] | None = None) -> CachedMapView:
        """:meth:`estimate` for a decision hot path: see :class:`CachedMapView`."""
        return CachedMapView(self, ttl_s, self.clock if clock is None else clock)

    # -- tomography -----------------------------------------------------------------------
    def localise_inflation(self, now: float | None = None, threshold_s: float = 1e-3) -> int:
        """Attribute RTT inflation (srtt - min) to shared links that no counter measures.

        Boolean tomography by intersection: a link's queueing delay is at most the smallest
        inflation among fresh pairs whose path crosses it, so an uninflated pair clears every
        link it crosses. Links whose bound exceeds ``threshold_s`` get that delay and are
        marked saturated with :data:`INFERRED_CONFIDENCE`. Returns the number of such links.
        Cost: O(probed pairs * path length).
        """
        now = self.clock() if now is None else now
        counted = self.link_confidence(now) >= COUNTER_CONFIDENCE * 0.5
        counted &= self.source_confidence >= COUNTER_CONFIDENCE
        bound_s = np.full(self.topology.n_links, np.inf)
        fresh = [(a, b, max(p.srtt_s - p.min_s, 0.0)) for (a, b), p in self.pairs.items()
                 if a != b and now - p.ts <= self.params.fresh_s]
        if fresh:
            ends = np.array([(a, b) for a, b, _ in fresh], dtype=np.int64)
            inflation = np.array([x for _, _, x in fresh])
            # Both directions: RTT crosses the forward and the reverse path.
            for src_col, dst_col in ((0, 1), (1, 0)):
                for src in np.unique(ends[:, src_col]).tolist():
                    rows = ends[:, src_col] == src
                    _, links, mask = self.topology.path_matrix(src, ends[rows, dst_col])
                    values = np.broadcast_to(inflation[rows][:, None], links.shape)
                    np.minimum.at(bound_s, links[mask], values[mask])
        kinds = {LinkKind.LEAF_UP, LinkKind.LEAF_DOWN, LinkKind.POD_UP, LinkKind.POD_DOWN}
        found = 0
        for i, link in enumerate(self.topology.links):
            if link.kind not in kinds or counted[i] or not np.isfinite(bound_s[i]):
                continue
            if bound_s[i] > threshold_s:
                self.observe_link(i, self.capacity[i], now, queue_s=float(bound_s[i]),
                                  confidence=INFERRED_CONFIDENCE)
                found += 1
            elif self.source_confidence[i] <= INFERRED_CONFIDENCE:
                self.observe_link(i, 0.0, now, queue_s=0.0, confidence=INFERRED_CONFIDENCE)
        return found

    # -- snapshots ------------------------------------------------------------------------
    def to_snapshot(self, version: int, created_ts: float | None = None) -> bytes:
        """Serialise the map (see the module docstring for the layout)."""
        created = self.clock() if created_ts is None else created_ts
        pairs = list(self.pairs.items())
        hosts = self.topology.hosts
        body = {
            "schema": SNAPSHOT_SCHEMA,
            "version": int(version),
            "created_ts": float(created),
            "params": {"fresh_s": self.params.fresh_s, "stale_s": self.params.stale_s,
                       "min_share": self.params.min_share, "max_loss": self.params.max_loss},
            "links": {
                "name": [lk.name for lk in self.topology.links],
                "util_bytes_s": self.util.tolist(),
                "capacity_bytes_s": self.capacity.tolist(),
                "queue_s": self.queue_s.tolist(),
                "updated_ts": self.updated_ts.tolist(),
                "confidence": self.source_confidence.tolist(),
            },
            "hosts": {"name": [h.name for h in hosts], "seen_ts": self.host_seen_ts.tolist()},
            "pairs": {
                "a": [hosts[a].name for (a, _), _ in pairs],
                "b": [hosts[b].name for (_, b), _ in pairs],
                "srtt_s": [p.srtt_s for _, p in pairs],
                "min_s": [p.min_s for _, p in pairs],
                "p99_s": [p.p99_s for _, p in pairs],
                "loss": [p.loss for _, p in pairs],
                "ts": [p.ts for _, p in pairs],
            },
        }
        out: bytes = msgpack.packb(body, use_bin_type=True)
        return out

    @classmethod
    def from_snapshot(cls, topology: Topology, data: bytes,
                      clock: Callable[[], float] = time.time) -> CongestionMap:
        """Rebuild a map from :meth:`to_snapshot` bytes; raises :class:`SnapshotError`."""
        header = snapshot_header(data)
        raw = header.pop("_raw")
        p = _exact(raw["params"], "params", {"fresh_s", "stale_s", "min_share", "max_loss"})
        try:
            params = MapParams(**{k: _finite(v, f"params.{k}") for k, v in p.items()})
        except (TypeError, ValueError) as exc:
            raise SnapshotError("params", str(exc)) from None
        cmap = cls(topology, params, clock)
        cmap.version = header["version"]
        cmap.created_ts = header["created_ts"]
        links = _exact(raw["links"], "links", {"name", "util_bytes_s", "capacity_bytes_s",
                                                "queue_s", "updated_ts", "confidence"})
        idx = _indices(links["name"], topology.link_index, "links.name")
        for key, arr in (("util_bytes_s", cmap.util), ("capacity_bytes_s", cmap.capacity),
                         ("queue_s", cmap.queue_s), ("updated_ts", cmap.updated_ts),
                         ("confidence", cmap.source_confidence)):
            arr[idx] = _floats(links[key], f"links.{key}", len(idx))
        if np.any(cmap.source_confidence > 1):
            raise SnapshotError("links.confidence", "must be <= 1")
        hosts = _exact(raw["hosts"], "hosts", {"name", "seen_ts"})
        hidx = _indices(hosts["name"], topology.host_index, "hosts.name")
        cmap.host_seen_ts[hidx] = _floats(hosts["seen_ts"], "hosts.seen_ts", len(hidx))
        pairs = _exact(raw["pairs"], "pairs", {"a", "b", "srtt_s", "min_s", "p99_s", "loss",
                                               "ts"})
        a = _indices(pairs["a"], topology.host_index, "pairs.a", unique=False)
        b = _indices(pairs["b"], topology.host_index, "pairs.b", unique=False)
        if len(a) != len(b):
            raise SnapshotError("pairs.b", f"expected {len(a)} values, got {len(b)}")
        cols = {k: _floats(pairs[k], f"pairs.{k}", len(a))
                for k in ("srtt_s", "min_s", "p99_s", "loss", "ts")}
        if np.any(cols["loss"] > 1):
            raise SnapshotError("pairs.loss", "must be <= 1")
        rows = zip(a.tolist(), b.tolist(), *(cols[k].tolist() for k in
                                             ("srtt_s", "min_s", "p99_s", "loss", "ts")),
                   strict=True)
        for x, y, srtt, lo, p99, loss, ts in rows:
            cmap._set_pair((x, y) if x <= y else (y, x), PairState(srtt, lo, p99, loss, ts))
        return cmap


def _with_pairs(base: CostEstimate, weight: FloatArray, half_rtt: FloatArray,
                loss: FloatArray, nbytes: FloatArray | float) -> CostEstimate:
    """Blend per-pair RTT and loss (see :meth:`CongestionMap.pair_terms`) into a link-path
    estimate: the module docstring's latency and bandwidth formulas."""
    latency = weight * half_rtt + (1 - weight) * base.latency_s
    bandwidth = base.bandwidth_bytes_s * (1.0 - weight * loss)
    seconds = latency + np.asarray(nbytes, dtype=np.float64) / bandwidth
    return CostEstimate(seconds, latency, bandwidth, base.tier, base.age_s, base.confidence)


class CachedMapView:
    """:meth:`CongestionMap.estimate` shaped for a decision hot path.

    The link view (freshness, blended bandwidth) is re-read at most every ``ttl_s`` and
    whenever the map changes; within it each source's row to every host is computed once
    (path-table reductions plus that source's pair corrections), so a decision costs
    O(|D|) numpy. Rows are exact for the time the view was taken.
    """

    def __init__(self, cmap: CongestionMap, ttl_s: float, clock: Callable[[], float]) -> None:
        self.cmap = cmap
        self.topology = cmap.topology
        self.ttl_s = ttl_s
        self.clock = clock
        self._view: LinkStateOracle | None = None
        self._at = -math.inf
        self._generation = -1
        self._rows: dict[int, CostEstimate] = {}

    def _fresh(self) -> tuple[LinkStateOracle, float]:
        now = self.clock()
        if (self._view is None or now - self._at > self.ttl_s
                or self._generation != self.cmap.generation):
            self._view = self.cmap.link_view(now)
            self._at, self._generation = now, self.cmap.generation
            self._rows.clear()
        return self._view, self._at

    @property
    def available_bytes_s(self) -> FloatArray:
        """Per-link bandwidth of the current view (the bookings' link rates)."""
        return self._fresh()[0].available_bytes_s

    def row(self, src: int) -> CostEstimate:
        """Zero-byte estimate from ``src`` to every host."""
        view, at = self._fresh()
        hit = self._rows.get(src)
        if hit is None:
            base = link_state_paths(view, src)
            hit = _with_pairs(base, *self.cmap.pair_terms(src, at), 0.0)
            self._rows[src] = hit
        return hit

    def estimate(self, src: int, dsts: IntArray, nbytes: FloatArray | float) -> CostEstimate:
        return pick(self.row(src), dsts, nbytes)


def snapshot_header(data: bytes) -> dict[str, Any]:
    """Decode a snapshot's envelope (schema, version, created_ts) strictly.

    Cheap enough for a consumer to decide whether a snapshot is newer than the one it holds.
    The returned dict also carries the decoded body under ``_raw``.
    """
    if not isinstance(data, bytes | bytearray):
        raise SnapshotError("", "expected bytes")
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError("", f"{len(data)} bytes exceeds {MAX_SNAPSHOT_BYTES}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as exc:
        raise SnapshotError("", f"not a msgpack snapshot: {exc}") from None
    if not isinstance(raw, dict):
        raise SnapshotError("", "a snapshot must be a map")
    if raw.get("schema") != SNAPSHOT_SCHEMA:
        raise SnapshotError("schema", f"unsupported schema {raw.get('schema')!r}, "
                            f"this reader knows {SNAPSHOT_SCHEMA}")
    _exact(raw, "", {"schema", "version", "created_ts", "params", "links", "hosts", "pairs"})
    version = raw["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise SnapshotError("version", "expected a non-negative integer")
    created = _finite(raw["created_ts"], "created_ts")
    return {"version": version, "created_ts": created, "_raw": raw}


def _exact(raw: Any, where: str, keys: set[str]) -> dict[str, Any]:
    prefix = f"{where}." if where else ""
    if not isinstance(raw, dict):
        raise SnapshotError(where, "expected a map")
    extra = sorted(str(k) for k in raw if k not in keys)
    if extra:
        raise SnapshotError(f"{prefix}{extra[0]}", "unknown field")
    missing = sorted(keys - set(raw))
    if missing:
        raise SnapshotError(f"{prefix}{missing[0]}", "missing field")
    return raw


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SnapshotError(where, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise SnapshotError(where, f"must be finite and >= 0, got {value!r}")
    return float(value)


def _floats(raw: Any, where: str, n: int) -> FloatArray:
    if not isinstance(raw, list) or len(raw) != n:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise SnapshotError(where, f"expected a list of {n} numbers, got {got}")
    if not set(map(type, raw)) <= {int, float}:  # one pass; bools and strings are out
        raise SnapshotError(where, "expected numbers only")
    arr = np.asarray(raw, dtype=np.float64)
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr < 0)):
        raise SnapshotError(where, "values must be finite and >= 0")
    return arr


def _indices(raw: Any, index: dict[str, int], where: str, *, unique: bool = True) -> IntArray:
    if not isinstance(raw, list):
        raise SnapshotError(where, "expected a list of names")
    try:
        found = [index.get(name) if isinstance(name, str) else None for name in raw]
    except TypeError:
        found = [None]
    if None in found:
        i = found.index(None)
        raise SnapshotError(f"{where}[{i}]", f"unknown name {raw[i]!r:.80} for this topology")
    out = np.array(found, dtype=np.int64)
    if unique and len(set(found)) != len(found):
        raise SnapshotError(where, "duplicate names")
    return out
