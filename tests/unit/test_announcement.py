"""The map-version announcement shared by the oracle (writer) and the scheduler (reader)."""

from __future__ import annotations

import msgpack
import pytest

from netkv.contracts.announcement import (
    Announcement,
    AnnouncementHint,
    announced_version,
    announcement_hint,
)

pytestmark = pytest.mark.unit

SAMPLE = Announcement(41, 1_700_000_000.5, "netkv:{map}:snapshot", "oracle-a", "9f3c0a1b2c3d4e5f")


def test_round_trip_and_the_reader_sees_the_writers_version() -> None:
    payload = SAMPLE.encode()
    assert Announcement.decode(payload) == SAMPLE
    assert announced_version(payload) == 41


def test_announced_version_forms() -> None:
    assert announced_version(b'{"version": 7, "created_ts": 1.0}') == 7
    assert announced_version(b"12") == 12
    assert announced_version(msgpack.packb({"version": 3})) == 3
    for bad in (b'{"version": -1}', b'{"version": true}', b"\xc1", b'"7"', b"{}"):
        with pytest.raises(ValueError, match="version|JSON"):
            announced_version(bad)


@pytest.mark.parametrize(("payload", "field"), [
    (b"\xc1", "not JSON"),
    (b'{"version": 1}', "expected version, created_ts"),
    (b'{"version": -1, "created_ts": 1, '
     b'"snapshot_key": "k", "oracle": "o", "epoch": "ab"}', "version"),
    (b'{"version": true, "created_ts": 1, '
     b'"snapshot_key": "k", "oracle": "o", "epoch": "ab"}', "version"),
    (b'{"version": 1, "created_ts": "now", '
     b'"snapshot_key": "k", "oracle": "o", "epoch": "ab"}', "created_ts"),
    (b'{"version": 1, "created_ts": 1, '
     b'"snapshot_key": 5, "oracle": "o", "epoch": "ab"}', "snapshot_key"),
    (b'{"version": 1, "created_ts": 1, "snapshot_key": "k", "oracle": "o", "epoch": "ab", "x": 1}',
     "expected version"),
    (b'{"version": 1, "created_ts": 1, "snapshot_key": "k", "oracle": "o", "epoch": "XYZ"}',
     "epoch"),
])
def test_strict_decode_names_the_field(payload: bytes, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Announcement.decode(payload)


def test_the_hint_carries_the_epoch() -> None:
    assert announcement_hint(SAMPLE.encode()) == AnnouncementHint(41, "9f3c0a1b2c3d4e5f")
    assert announcement_hint(b'{"version": 3}').epoch is None


@pytest.mark.security
@pytest.mark.parametrize("payload", [b"[" * 100_000, b"[" * 4000, b'{"version": ' + b"[" * 3000])
def test_deeply_nested_announcements_are_rejected_not_recursed(payload: bytes) -> None:
    """Issue 9 finding 2: a 100k-deep JSON array raised RecursionError in the reader (json
    and msgpack recursed), which ended the scheduler's feed loops. Now a ValueError."""
    with pytest.raises(ValueError, match="version"):
        announced_version(payload)
    with pytest.raises(ValueError, match="announcement"):
        Announcement.decode(payload)
