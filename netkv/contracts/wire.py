"""The wire format of sample batches: msgpack with an explicit schema version, decoded strictly.

A batch is a msgpack map ``{"v": 2, "agent": str, "seq": int, "ts": float, "samples": [...]}``
and each sample a map ``{"k": kind, <field>: <value>, ...}`` with exactly the fields of its
type in :mod:`netkv.contracts.samples`. One msgspec decoder validates the whole batch in one
pass; it rejects, with a :class:`WireError` that names the field, anything else: another
version, unknown or missing fields, wrong types, NaN, negative or absurdly large numbers,
over-long names, oversized batches, truncated bytes. Callers count rejections by
``WireError.reason`` (a short label for metrics).

Version 2 (this one) added ``capacity_bps`` and ``oper_up`` to NIC samples (and dropped
``speed_bytes_s``); a version-1 batch is refused as ``bad_version``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from netkv.contracts.errors import ContractError, from_msgspec, split
from netkv.contracts.fields import Name, NameCheck, UnixTime
from netkv.contracts.samples import NicSample, QdiscSample, RdmaSample, RttSample, Sample

SCHEMA_VERSION: Literal[2] = 2
MAX_BATCH_BYTES = 512 * 1024
MAX_SAMPLES = 4096


class WireError(ContractError):
    """A batch or sample that does not follow the schema. ``reason`` is a metric label."""


# gc=False: a batch holds numbers, strings and a tuple of samples (themselves untracked), so
# no reference cycle can pass through it (see netkv.contracts.samples).
class Batch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    agent: Name
    seq: Annotated[int, msgspec.Meta(ge=0)]
    ts: UnixTime
    samples: tuple[Sample, ...]


class _WireBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """The batch as it travels: ``v`` first, then the batch's fields."""

    v: Literal[2]
    agent: Name
    seq: Annotated[int, msgspec.Meta(ge=0)]
    ts: UnixTime
    samples: Annotated[tuple[Sample, ...], msgspec.Meta(max_length=MAX_SAMPLES)]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_WireBatch)
_NAMES = NameCheck()


def encode_batch(batch: Batch) -> bytes:
    """Serialise a batch (the agent side)."""
    return _ENCODER.encode(_WireBatch(SCHEMA_VERSION, batch.agent, batch.seq, batch.ts,
                                      batch.samples))


def _untyped(data: bytes) -> Any:
    return msgspec.msgpack.decode(data)


def decode_batch(data: bytes) -> Batch:
    """Parse and validate one batch (the oracle side). Raises :class:`WireError`."""
    if len(data) > MAX_BATCH_BYTES:
        raise WireError("oversized", "batch", f"{len(data)} bytes exceeds {MAX_BATCH_BYTES}")
    try:
        wire = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise _classify(exc, data) from None
    except msgspec.DecodeError as exc:
        raise WireError("undecodable", "batch", f"not a msgpack batch: {exc}") from None
    _check_names(wire.samples)
    return Batch(wire.agent, wire.seq, wire.ts, wire.samples)


_SUBJECT: dict[type, str] = {RttSample: "peer", NicSample: "nic", QdiscSample: "nic",
                             RdmaSample: "device"}


def _check_names(samples: tuple[Sample, ...]) -> None:
    """Every reporter and subject name follows :data:`~netkv.contracts.fields.NAME_PATTERN`:
    checked once per distinct name (a batch repeats the same few)."""
    subject = _SUBJECT
    names = {s.reporter for s in samples}
    names |= {s.peer if type(s) is RttSample else getattr(s, subject[type(s)])
              for s in samples}
    if _NAMES.known(names) or all(map(_NAMES, names)):
        return
    for i, s in enumerate(samples):
        for field in ("reporter", subject[type(s)]):
            value = getattr(s, field)
            if not _NAMES(value):
                raise WireError("bad_name", f"batch.samples[{i}].{field}",
                                f"expected a name of [A-Za-z0-9._:/-], at most 64 "
                                f"characters, got {value!r:.80}")


def _classify(exc: msgspec.ValidationError, data: bytes) -> WireError:
    error = from_msgspec(exc, "batch", lambda: _untyped(data))
    reason, where = error.reason, error.where
    if where == "batch.v":
        return WireError("bad_version", where, f"unsupported schema version, this oracle "
                         f"reads {SCHEMA_VERSION}")
    if where.endswith(".k"):
        return WireError("unknown_kind", where, "unknown sample kind")
    if where == "batch" and "Expected `object`" in str(exc):
        return WireError("bad_type", where, "a batch must be a map")
    if where == "batch.samples" and "length" in str(exc):
        return WireError("oversized", where, f"more than {MAX_SAMPLES} samples")
    if reason == "invalid":  # a cross-field check (__post_init__): lost > sent
        message = split(exc)[0]
        field = ".lost" if "lost" in message else ""
        return WireError("out_of_range", where + field, message)
    return WireError(reason, where, split(exc)[0])
