"""The contracts' error: which field, why (a short label for metrics), and a message.

msgspec reports the first problem it meets as ``"<what> - at `$.a[0].b`"``; :func:`from_msgspec`
turns that into :class:`ContractError` with ``where`` the dotted path under the message's
root name (``batch.samples[0].tx_bytes_s``) and ``reason`` a label such as ``unknown_field``,
``missing_field``, ``bad_type``, ``bad_name``, ``negative``, ``too_large``, ``not_finite``.
Out-of-range numbers need the offending value to say which (msgspec's message has only the
bound), so the slow path re-reads it from the untyped document; this runs only on rejects.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import msgspec


class ContractError(ValueError):
    """A message that does not follow its contract. ``where`` names the field; ``reason`` is
    a metric label."""

    def __init__(self, reason: str, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.reason = reason
        self.where = where


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_FIELD = re.compile(r"field `(?P<name>[^`]*)`")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def split(exc: msgspec.ValidationError) -> tuple[str, str]:
    """``(message, path)`` of a msgspec error; the path is ``""`` (the root) or ``".a[0].b"``."""
    found = _AT.match(str(exc))
    assert found is not None  # the pattern matches any string
    return found["what"], found["path"] or ""


def value_at(doc: Any, path: str) -> Any:
    """The value at a msgspec path in an untyped document (``None`` if it is not there)."""
    node = doc
    for key, index in _STEP.findall(path):
        try:
            node = node[int(index)] if index else node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def reason_of(what: str, value: Any) -> str:
    """A metric label for one msgspec message (``value`` is the offending value, if known)."""
    if "unknown field" in what:
        return "unknown_field"
    if "missing required field" in what:
        return "missing_field"
    if "matching regex" in what or "length" in what:
        return "bad_name"
    if what.startswith("Invalid enum value"):
        return "bad_version"
    if ">" in what or "<" in what:  # a bound: which one the value broke says why
        if not isinstance(value, float):
            return "out_of_range"  # integers (counts, ports, versions) and unknowns
        if not math.isfinite(value):
            return "not_finite"
        if value < 0:
            return "negative"
        return "too_large" if "<" in what else "out_of_range"
    if what.startswith("Expected"):
        return "bad_type"
    return "invalid"


def from_msgspec(exc: msgspec.ValidationError, root: str,
                 untyped: Callable[[], Any] | None = None) -> ContractError:
    """A :class:`ContractError` for ``exc``; ``untyped()`` decodes the document without a
    schema, to find the offending value (only called for range errors)."""
    what, path = split(exc)
    field = _FIELD.search(what)
    where = root + path
    if field is not None and ("unknown field" in what or "missing required" in what):
        where = f"{where}.{field['name']}"
    value = None
    if untyped is not None and any(op in what for op in ("<", ">")):
        try:
            value = value_at(untyped(), path)
        except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
            value = None
    return ContractError(reason_of(what, value), where, what)
