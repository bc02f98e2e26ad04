"""The wire format of sample batches: msgpack with an explicit schema version, decoded strictly.

A batch is a msgpack map ``{"v": 1, "agent": str, "seq": int, "ts": float, "samples": [...]}``
and each sample a map ``{"k": kind, <field>: <value>, ...}`` with exactly the fields of its
type in :mod:`netkv.telemetry.samples`. Decoding rejects, with a :class:`WireError` that names
the field, anything else: another version, unknown or missing fields, wrong types, NaN,
negative or absurdly large numbers, over-long names, oversized batches, truncated bytes.
Callers count rejections by ``WireError.reason`` (a short label for metrics).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import msgpack

from netkv.telemetry.samples import SAMPLE_TYPES, Sample

SCHEMA_VERSION = 1
MAX_BATCH_BYTES = 512 * 1024
MAX_SAMPLES = 4096
MAX_RATE = 1e13  # bytes or events per second: 80 Tb/s is beyond any NIC
MAX_SECONDS = 3600.0  # windows and RTTs
MAX_COUNT = 10_000_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")


class WireError(ValueError):
    """A batch or sample that does not follow the schema. ``reason`` is a metric label."""

    def __init__(self, reason: str, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.reason = reason
        self.where = where


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    agent: str
    seq: int
    ts: float
    samples: tuple[Sample, ...]


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # sample class -> its field names, in order


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:  # dataclasses.fields() is slow enough to matter per sample
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def encode_batch(batch: Batch) -> bytes:
    """Serialise a batch (the agent side)."""
    samples = []
    for s in batch.samples:
        body: dict[str, Any] = {"k": s.kind}
        for name in _field_names(type(s)):
            body[name] = getattr(s, name)
        samples.append(body)
    out: bytes = msgpack.packb(
        {"v": SCHEMA_VERSION, "agent": batch.agent, "seq": batch.seq, "ts": batch.ts,
         "samples": samples}, use_bin_type=True)
    return out


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise WireError("bad_name", where, f"expected a name of [A-Za-z0-9._:/-], "
                        f"at most 64 characters, got {value!r:.80}")
    return value


def _number(value: Any, where: str, upper: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError("bad_type", where, f"expected a number, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise WireError("not_finite", where, f"must be finite, got {value!r}")
    if number < 0:
        raise WireError("negative", where, f"must be >= 0, got {value!r}")
    if number > upper:
        raise WireError("too_large", where, f"must be <= {upper:g}, got {value!r}")
    return number


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError("bad_type", where, f"expected an integer, got {type(value).__name__}")
    if value < 0 or value > MAX_COUNT:
        raise WireError("out_of_range", where, f"must be in [0, {MAX_COUNT}], got {value}")
    return value


_SECONDS_FIELDS = {"window_s", "srtt_s", "p50_s", "p99_s", "min_s"}
_NAME_FIELDS = {"reporter", "peer", "nic", "device"}
_INT_FIELDS = {"sent", "lost", "port"}


def _decode_sample(raw: Any, where: str) -> Sample:
    if not isinstance(raw, dict):
        raise WireError("bad_type", where, "a sample must be a map")
    kind = raw.get("k")
    cls = SAMPLE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError("unknown_kind", f"{where}.k", f"unknown sample kind {kind!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    extra = sorted(str(k) for k in raw if k != "k" and k not in names)
    if extra:
        raise WireError("unknown_field", f"{where}.{extra[0]}", "unknown field")
    values: dict[str, Any] = {}
    for name in names:
        path = f"{where}.{name}"
        if name not in raw:
            raise WireError("missing_field", path, "missing field")
        value = raw[name]
        if name in _NAME_FIELDS:
            values[name] = _name(value, path)
        elif name in _INT_FIELDS:
            values[name] = _integer(value, path)
        elif name == "ts":
            values[name] = _number(value, path, 1e11)
        elif name in _SECONDS_FIELDS:
            values[name] = _number(value, path, MAX_SECONDS)
        else:
            values[name] = _number(value, path, MAX_RATE)
    if "window_s" in values and values["window_s"] <= 0:
        raise WireError("out_of_range", f"{where}.window_s", "must be > 0")
    if "lost" in values and values["lost"] > values["sent"]:
        raise WireError("out_of_range", f"{where}.lost", "cannot exceed sent")
    return cls(**values)


def decode_batch(data: bytes) -> Batch:
    """Parse and validate one batch (the oracle side). Raises :class:`WireError`."""
    if len(data) > MAX_BATCH_BYTES:
        raise WireError("oversized", "batch", f"{len(data)} bytes exceeds {MAX_BATCH_BYTES}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=MAX_SAMPLES,
                              max_map_len=64, max_str_len=256, max_bin_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as exc:
        raise WireError("undecodable", "batch", f"not a msgpack batch: {exc}") from None
    if not isinstance(raw, dict):
        raise WireError("bad_type", "batch", "a batch must be a map")
    version = raw.get("v")
    if version != SCHEMA_VERSION:
        raise WireError("bad_version", "batch.v", f"unsupported schema version {version!r}, "
                        f"this oracle reads {SCHEMA_VERSION}")
    extra = sorted(str(k) for k in raw if k not in {"v", "agent", "seq", "ts", "samples"})
    if extra:
        raise WireError("unknown_field", f"batch.{extra[0]}", "unknown field")
    for key in ("agent", "seq", "ts", "samples"):
        if key not in raw:
            raise WireError("missing_field", f"batch.{key}", "missing field")
    agent = _name(raw["agent"], "batch.agent")
    seq = raw["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise WireError("bad_type", "batch.seq", "expected a non-negative integer")
    ts = _number(raw["ts"], "batch.ts", 1e11)
    samples = raw["samples"]
    if not isinstance(samples, list):
        raise WireError("bad_type", "batch.samples", "expected a list")
    if len(samples) > MAX_SAMPLES:
        raise WireError("oversized", "batch.samples", f"more than {MAX_SAMPLES} samples")
    decoded = tuple(_decode_sample(s, f"batch.samples[{i}]") for i, s in enumerate(samples))
    return Batch(agent, seq, ts, decoded)
