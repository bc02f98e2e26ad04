"""The published congestion map: a versioned msgpack snapshot in Redis, decoded strictly.

The oracle writes it (:func:`encode_snapshot`); followers, a new leader and the scheduler read
it (:func:`decode_snapshot`, or :func:`snapshot_header` to see whether it is newer than the
map held without decoding the arrays). Layout (schema 2)::

    {"schema": 2, "version": int, "created_ts": unix s, "epoch": hex,
     "agents": {agent id: last seen unix s},
     "params": {"fresh_s", "stale_s", "min_share", "max_loss"},
     "links": {"name": [...], "util_bytes_s": [...], "capacity_bytes_s": [...],
               "queue_s": [...], "updated_ts": [...], "confidence": [...], "up": [bool]},
     "hosts": {"name": [...], "seen_ts": [...]},
     "pairs": {"a": [...], "b": [...], "srtt_s": [...], "min_s": [...], "p99_s": [...],
               "loss": [...], "ts": [...]}}

* ``version`` is monotonic within one ``epoch``. ``epoch`` is the random id of the oracle's
  leader term (a new one at every start and every won election), so a reader can tell a
  restarted oracle (whose counter may start again at 1 on an empty Redis) from an old
  message: a lower version with an epoch it has not seen is news.
* ``agents`` is per-agent freshness: when each agent (host or switch agent) was last heard
  from, so a reader can name the agents that were reporting and went silent.
* Arrays are keyed by the ``name`` arrays, not by position. Decoding rejects another schema,
  unknown or missing fields, unknown link/host names, wrong lengths and non-finite or negative
  numbers, with a :class:`SnapshotError` whose ``where`` names the field.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec
import numpy as np

from netkv.contracts.errors import ContractError, from_msgspec
from netkv.contracts.fields import Epoch, NonNegative, Version
from netkv.core.congestion import CongestionMap, MapParams, PairState
from netkv.core.topology import FloatArray, IntArray, Topology

SNAPSHOT_SCHEMA: Literal[2] = 2
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024

Floats = list[NonNegative]
Names = list[str]


def new_epoch() -> str:
    """A fresh oracle-term id: 16 random hex digits (64 bits: no two terms share one)."""
    return secrets.token_hex(8)


class SnapshotError(ContractError):
    """A snapshot that does not follow the schema; ``where`` names the field."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__("bad_snapshot", where, message)
        self.args = (f"snapshot.{where}: {message}",)


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class SnapshotParams(_Strict, frozen=True):
    fresh_s: NonNegative
    stale_s: NonNegative
    min_share: NonNegative
    max_loss: NonNegative


class LinkColumns(_Strict, frozen=True):
    name: Names
    util_bytes_s: Floats
    capacity_bytes_s: Floats
    queue_s: Floats
    updated_ts: Floats
    confidence: Floats
    up: list[bool]


class HostColumns(_Strict, frozen=True):
    name: Names
    seen_ts: Floats


class PairColumns(_Strict, frozen=True):
    a: Names
    b: Names
    srtt_s: Floats
    min_s: Floats
    p99_s: Floats
    loss: Floats
    ts: Floats


class Snapshot(_Strict, frozen=True):
    schema: Literal[2]
    version: Version
    created_ts: NonNegative
    epoch: Epoch
    agents: Annotated[dict[str, NonNegative], msgspec.Meta(max_length=1_000_000)]
    params: SnapshotParams
    links: LinkColumns
    hosts: HostColumns
    pairs: PairColumns


class SnapshotHeader(msgspec.Struct, frozen=True):
    """The envelope: enough to tell whether a snapshot is newer than the map held."""

    schema: Literal[2]
    version: Version
    created_ts: NonNegative
    epoch: Epoch


class _LinksOnly(msgspec.Struct, frozen=True):
    links: LinkColumns


_ENCODER = msgspec.msgpack.Encoder()
_LINKS = msgspec.msgpack.Decoder(_LinksOnly)
_DECODER = msgspec.msgpack.Decoder(Snapshot)
_HEADER = msgspec.msgpack.Decoder(SnapshotHeader)


def encode_snapshot(cmap: CongestionMap, version: int, created_ts: float | None = None,
                    epoch: str | None = None) -> bytes:
    """Serialise the map as published ``version`` of ``epoch`` (default: the map's own)."""
    created = cmap.clock() if created_ts is None else created_ts
    pairs = list(cmap.pairs.items())
    hosts = cmap.topology.hosts
    p = cmap.params
    body = Snapshot(
        schema=SNAPSHOT_SCHEMA, version=int(version), created_ts=float(created),
        epoch=cmap.epoch if epoch is None else epoch, agents=dict(cmap.agents),
        params=SnapshotParams(p.fresh_s, p.stale_s, p.min_share, p.max_loss),
        links=LinkColumns(
            [lk.name for lk in cmap.topology.links], cmap.util.tolist(),
            cmap.capacity.tolist(), cmap.queue_s.tolist(), cmap.updated_ts.tolist(),
            cmap.source_confidence.tolist(), cmap.link_up.tolist()),
        hosts=HostColumns([h.name for h in hosts], cmap.host_seen_ts.tolist()),
        pairs=PairColumns(
            [hosts[a].name for (a, _), _ in pairs], [hosts[b].name for (_, b), _ in pairs],
            [q.srtt_s for _, q in pairs], [q.min_s for _, q in pairs],
            [q.p99_s for _, q in pairs], [q.loss for _, q in pairs],
            [q.ts for _, q in pairs]))
    return _ENCODER.encode(body)


def _size(data: bytes) -> None:
    if not isinstance(data, bytes | bytearray):
        raise SnapshotError("", "expected bytes")
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError("", f"{len(data)} bytes exceeds {MAX_SNAPSHOT_BYTES}")


def _error(exc: msgspec.DecodeError, data: bytes) -> SnapshotError:
    if not isinstance(exc, msgspec.ValidationError):
        return SnapshotError("", f"not a msgpack snapshot: {exc}")
    error = from_msgspec(exc, "", lambda: msgspec.msgpack.decode(data))
    where = error.where.removeprefix(".")
    message = str(exc).split(" - at ", 1)[0]
    if error.reason in ("negative", "not_finite", "too_large", "out_of_range"):
        message = f"must be finite and >= 0 ({message})"
    if where == "schema":
        message = f"unsupported schema, this reader knows {SNAPSHOT_SCHEMA} ({message})"
    return SnapshotError(where, message)


def snapshot_header(data: bytes) -> SnapshotHeader:
    """Decode a snapshot's envelope (schema, version, created_ts, epoch) strictly; cheap
    (the arrays are skipped, not built)."""
    _size(data)
    try:
        return _HEADER.decode(data)
    except msgspec.DecodeError as exc:
        raise _error(exc, data) from None


def snapshot_links(data: bytes) -> LinkColumns:
    """Only the per-link columns of a snapshot (monitoring tools that watch one link)."""
    _size(data)
    try:
        return _LINKS.decode(data).links
    except msgspec.DecodeError as exc:
        raise _error(exc, data) from None


def decode_snapshot(topology: Topology, data: bytes,
                    clock: Callable[[], float] = time.time) -> CongestionMap:
    """Rebuild a map from :func:`encode_snapshot` bytes; raises :class:`SnapshotError`."""
    _size(data)
    try:
        snap = _DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise _error(exc, data) from None
    p = snap.params
    try:
        params = MapParams(p.fresh_s, p.stale_s, p.min_share, p.max_loss)
    except (TypeError, ValueError) as exc:
        raise SnapshotError("params", str(exc)) from None
    cmap = CongestionMap(topology, params, clock)
    cmap.version, cmap.created_ts, cmap.epoch = snap.version, snap.created_ts, snap.epoch
    cmap.agents = dict(snap.agents)
    links = snap.links
    idx = _indices(links.name, topology.link_index, "links.name")
    for key, arr in (("util_bytes_s", cmap.util), ("capacity_bytes_s", cmap.capacity),
                     ("queue_s", cmap.queue_s), ("updated_ts", cmap.updated_ts),
                     ("confidence", cmap.source_confidence)):
        arr[idx] = _floats(getattr(links, key), f"links.{key}", len(idx))
    if len(links.up) != len(idx):
        raise SnapshotError("links.up", f"expected {len(idx)} values, got {len(links.up)}")
    cmap.link_up[idx] = np.asarray(links.up, dtype=bool)
    if np.any(cmap.source_confidence > 1):
        raise SnapshotError("links.confidence", "must be <= 1")
    hosts = snap.hosts
    hidx = _indices(hosts.name, topology.host_index, "hosts.name")
    cmap.host_seen_ts[hidx] = _floats(hosts.seen_ts, "hosts.seen_ts", len(hidx))
    pairs = snap.pairs
    a = _indices(pairs.a, topology.host_index, "pairs.a", unique=False)
    b = _indices(pairs.b, topology.host_index, "pairs.b", unique=False)
    if len(a) != len(b):
        raise SnapshotError("pairs.b", f"expected {len(a)} values, got {len(b)}")
    cols = [_floats(getattr(pairs, k), f"pairs.{k}", len(a)).tolist()
            for k in ("srtt_s", "min_s", "p99_s", "loss", "ts")]
    if any(loss > 1 for loss in cols[3]):
        raise SnapshotError("pairs.loss", "must be <= 1")
    for x, y, srtt, lo, p99, loss, ts in zip(a.tolist(), b.tolist(), *cols, strict=True):
        cmap.set_pair(x, y, PairState(srtt, lo, p99, loss, ts))
    return cmap


def _floats(raw: list[float], where: str, n: int) -> FloatArray:
    if len(raw) != n:
        raise SnapshotError(where, f"expected a list of {n} numbers, got {len(raw)}")
    return np.asarray(raw, dtype=np.float64)


def _indices(raw: list[str], index: dict[str, int], where: str, *,
             unique: bool = True) -> IntArray:
    found = [index.get(name) for name in raw]
    if None in found:
        i = found.index(None)
        raise SnapshotError(f"{where}[{i}]", f"unknown name {raw[i]!r:.80} for this topology")
    out = np.array(found, dtype=np.int64)
    if unique and len(set(found)) != len(found):
        raise SnapshotError(where, "duplicate names")
    return out
