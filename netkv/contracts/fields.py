"""Bounded field types shared by every contract (one definition of a name, a rate, a time).

Each is an ``Annotated`` type with :class:`msgspec.Meta` bounds, so decoding rejects values out
of range where they are read, in C, with the field's path in the error.
"""

from __future__ import annotations

import re
from typing import Annotated

from msgspec import Meta

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$"
"""Agent ids, interface names, link names, RDMA devices: letters, digits and ``._:/-``,
at most 64 characters, not starting with punctuation."""
NAME_RE = re.compile(NAME_PATTERN)

MAX_RATE = 1e13  # bytes or events per second: 80 Tb/s is beyond any NIC
MAX_SECONDS = 3600.0  # windows and RTTs
MAX_COUNT = 10_000_000
MAX_UNIX_TS = 1e11  # unix seconds (year 5138): anything larger is not a clock reading
MAX_BITS_S = 8 * MAX_RATE

Name = Annotated[str, Meta(pattern=NAME_PATTERN, max_length=64)]
ShortStr = Annotated[str, Meta(min_length=1, max_length=64)]
"""A name checked only for length by the decoder; the caller checks the pattern once per
distinct value (:class:`NameCheck`). For hot paths: a regex per string costs more than the
whole rest of a sample's decoding."""
Rate = Annotated[float, Meta(ge=0, le=MAX_RATE)]
BitsPerSecond = Annotated[float, Meta(ge=0, le=MAX_BITS_S)]
Seconds = Annotated[float, Meta(ge=0, le=MAX_SECONDS)]
Window = Annotated[float, Meta(gt=0, le=MAX_SECONDS)]
UnixTime = Annotated[float, Meta(ge=0, le=MAX_UNIX_TS)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Version = Annotated[int, Meta(ge=0)]
Fraction = Annotated[float, Meta(ge=0, le=1)]
NonNegative = Annotated[float, Meta(ge=0, le=1e300)]  # finite and >= 0
Epoch = Annotated[str, Meta(pattern=r"^[0-9a-f]{1,64}$")]
"""An oracle term's random id, lowercase hex (16 digits from the oracle; ``"0"`` for a map that no
oracle term published, e.g. one built in a test). See :mod:`netkv.contracts.snapshot`."""


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.match(value) is not None


class NameCheck:
    """:data:`NAME_PATTERN` with a bounded memory of the names that passed (names repeat:
    the same reporter and peers in every batch)."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._good: set[str] = set()

    def known(self, names: set[str]) -> bool:
        """All of ``names`` passed before (one set operation, the common case)."""
        return names <= self._good

    def __call__(self, value: str) -> bool:
        if value in self._good:
            return True
        if NAME_RE.match(value) is None:
            return False
        if len(self._good) >= self.capacity:
            self._good.clear()
        self._good.add(value)
        return True
