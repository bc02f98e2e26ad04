"""The map-version announcement: what the oracle publishes on ``MqttTopics.map_version``.

The oracle (the writer) and the scheduler (a reader) share this module, so the message has one
definition. The announcement is JSON ``{"version", "created_ts", "snapshot_key", "oracle",
"epoch"}``, retained, QoS 1; the snapshot itself is in Redis. ``epoch`` is the random id of the
oracle's leader term (lowercase hex, new at every start and every won election; the same value
as the snapshot's ``epoch``): a version lower than the one a reader holds is news when it comes
with an epoch the reader has not seen (an oracle restarted on an empty Redis counts from 1).

Readers that only need a hint to fetch the snapshot (which is validated strictly on its own)
use :func:`announcement_hint` / :func:`announced_version`: they also accept a msgpack map, a
map with only ``version`` (and ``epoch``) or extra fields, and a bare integer, so a newer or
minimal publisher still wakes them. :meth:`Announcement.decode` is the strict reading of the
whole message. Both are typed msgspec decoders: hostile payloads (a 100k-deep array, a huge
document) are rejected at the first value that does not fit, never recursed into.
"""

from __future__ import annotations

from typing import Any

import msgspec

from netkv.contracts.errors import ContractError, split
from netkv.contracts.fields import Epoch, UnixTime, Version

FIELDS = ("version", "created_ts", "snapshot_key", "oracle", "epoch")
MAX_ANNOUNCEMENT_BYTES = 4096


class Announcement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a map-version message on MQTT says."""

    version: Version
    created_ts: UnixTime
    snapshot_key: str
    oracle: str
    epoch: Epoch

    def encode(self) -> bytes:
        return _JSON.encode(self)

    @classmethod
    def decode(cls, payload: bytes) -> Announcement:
        """Strict: raises :class:`ContractError` (a ValueError) naming the field."""
        if len(payload) > MAX_ANNOUNCEMENT_BYTES:
            raise ContractError("oversized", "announcement", f"{len(payload)} bytes")
        try:
            return _STRICT.decode(payload)
        except msgspec.ValidationError as exc:
            what, path = split(exc)
            if "field" in what and not path:  # unknown or missing field
                raise ContractError("bad_fields", "announcement",
                                    f"expected {', '.join(FIELDS)} ({what})") from None
            raise ContractError("bad_value", f"announcement{path}", what) from None
        except msgspec.DecodeError as exc:
            raise ContractError("undecodable", "announcement",
                                f"not JSON: {exc}") from None


class AnnouncementHint(msgspec.Struct, frozen=True):
    """The lenient reading: the version, and the epoch when the publisher sent one."""

    version: Version
    epoch: Epoch | None = None


_JSON = msgspec.json.Encoder()
_STRICT = msgspec.json.Decoder(Announcement)
_HINT_JSON = msgspec.json.Decoder(AnnouncementHint | Version)
_HINT_MSGPACK = msgspec.msgpack.Decoder(AnnouncementHint | Version)


def announcement_hint(payload: bytes) -> AnnouncementHint:
    """Version (and epoch) of an announcement: JSON or msgpack ``{"version": n, ...}``, or a
    bare integer. Raises ValueError on anything else (never RecursionError)."""
    if len(payload) > MAX_ANNOUNCEMENT_BYTES:
        raise ValueError(f"announcement of {len(payload)} bytes exceeds "
                         f"{MAX_ANNOUNCEMENT_BYTES}: no version read")
    got: Any
    try:
        got = _HINT_JSON.decode(payload)
    except msgspec.DecodeError:
        try:
            got = _HINT_MSGPACK.decode(payload)
        except msgspec.DecodeError as exc:
            raise ValueError(f"no non-negative integer version in {payload[:80]!r}: "
                             f"not JSON or msgpack ({exc})") from None
    if isinstance(got, int):
        return AnnouncementHint(got)
    assert isinstance(got, AnnouncementHint)
    return got


def announced_version(payload: bytes) -> int:
    """The map version in an announcement (see :func:`announcement_hint`)."""
    return announcement_hint(payload).version
