"""The map-version announcement shared by the oracle (writer) and the scheduler (reader)."""

from __future__ import annotations

import msgpack
import pytest

from netkv.telemetry.announcement import Announcement, announced_version

pytestmark = pytest.mark.unit

SAMPLE = Announcement(41, 1_700_000_000.5, "netkv:{map}:snapshot", "oracle-a")


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
    (b'{"version": -1, "created_ts": 1, "snapshot_key": "k", "oracle": "o"}', "version"),
    (b'{"version": true, "created_ts": 1, "snapshot_key": "k", "oracle": "o"}', "version"),
    (b'{"version": 1, "created_ts": "now", "snapshot_key": "k", "oracle": "o"}', "created_ts"),
    (b'{"version": 1, "created_ts": 1, "snapshot_key": 5, "oracle": "o"}', "snapshot_key"),
    (b'{"version": 1, "created_ts": 1, "snapshot_key": "k", "oracle": "o", "x": 1}',
     "expected version"),
])
def test_strict_decode_names_the_field(payload: bytes, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Announcement.decode(payload)
