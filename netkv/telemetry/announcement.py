"""The map-version announcement: what the oracle publishes on ``MqttTopics.map_version``.

The oracle (the writer) and the scheduler (a reader) share this module, so the message has one
definition. The announcement is JSON ``{"version", "created_ts", "snapshot_key", "oracle"}``,
retained, QoS 1; the snapshot itself is in Redis.

Readers that only need the version (a hint to fetch the snapshot, which is validated strictly
on its own) use :func:`announced_version`: it also accepts a msgpack map, a map with only
``version`` or extra fields, and a bare integer, so a newer or minimal publisher still wakes
them. :meth:`Announcement.decode` is the strict reading of the whole message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgpack

FIELDS = frozenset({"version", "created_ts", "snapshot_key", "oracle"})


@dataclass(frozen=True, slots=True)
class Announcement:
    """What a map-version message on MQTT says."""

    version: int
    created_ts: float
    snapshot_key: str
    oracle: str

    def encode(self) -> bytes:
        return json.dumps({"version": self.version, "created_ts": self.created_ts,
                           "snapshot_key": self.snapshot_key, "oracle": self.oracle}).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Announcement:
        """Strict: raises ValueError naming the field."""
        try:
            raw = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"announcement: not JSON: {exc}") from None
        if not isinstance(raw, dict) or set(raw) != FIELDS:
            raise ValueError("announcement: expected version, created_ts, snapshot_key, oracle")
        v, ts = raw["version"], raw["created_ts"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError("announcement.version: expected a non-negative integer")
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            raise ValueError("announcement.created_ts: expected a number")
        if not isinstance(raw["snapshot_key"], str) or not isinstance(raw["oracle"], str):
            raise ValueError("announcement.snapshot_key/oracle: expected strings")
        return cls(v, float(ts), raw["snapshot_key"], raw["oracle"])


def announced_version(payload: bytes) -> int:
    """The map version in an announcement: JSON or msgpack ``{"version": n, ...}``, or a bare
    integer. Raises ValueError on anything else."""
    data: Any
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        try:
            data = msgpack.unpackb(payload, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ValueError(f"not JSON or msgpack: {exc}") from None
    if isinstance(data, dict):
        data = data.get("version")
    if isinstance(data, bool) or not isinstance(data, int) or data < 0:
        raise ValueError(f"no non-negative integer version in {payload[:80]!r}")
    return data
