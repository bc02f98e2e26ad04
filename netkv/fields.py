"""Strict conversion of untrusted mappings (YAML, JSON) into the core's frozen dataclasses.

Topology and scenario files and policy parameters go through :func:`from_mapping`, so
unknown keys, missing keys, wrong types and impossible numbers are rejected in one place, with
an error that names the field (``topology.yaml: hosts[3].nic_gbps: must be > 0``). It stays a
small dependency-free layer because the pure core must not depend on a config library; the
services' settings use pydantic-settings instead (:mod:`netkv.config`).

Numeric bounds live in the dataclass field metadata: ``field(metadata=bound(gt=0))``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from netkv.errors import InputError

T = TypeVar("T")


def bound(
    *, gt: float | None = None, ge: float | None = None, le: float | None = None,
    lt: float | None = None,
) -> dict[str, float]:
    """Field metadata with numeric bounds, checked by :func:`from_mapping`."""
    limits = {"gt": gt, "ge": ge, "le": le, "lt": lt}
    return {k: v for k, v in limits.items() if v is not None}


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _check_bounds(value: float, meta: Mapping[str, Any], where: str) -> None:
    if "gt" in meta and not value > meta["gt"]:
        raise InputError(where, f"must be > {meta['gt']}, got {value!r}")
    if "ge" in meta and not value >= meta["ge"]:
        raise InputError(where, f"must be >= {meta['ge']}, got {value!r}")
    if "lt" in meta and not value < meta["lt"]:
        raise InputError(where, f"must be < {meta['lt']}, got {value!r}")
    if "le" in meta and not value <= meta["le"]:
        raise InputError(where, f"must be <= {meta['le']}, got {value!r}")


def _convert_union(value: Any, args: tuple[Any, ...], where: str,
                   meta: Mapping[str, Any]) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise InputError(where, "must not be null")
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1:
        return convert(value, inner[0], where, meta)
    errors: list[str] = []
    for option in inner:
        try:
            return convert(value, option, where, meta)
        except InputError as exc:
            errors.append(exc.message)
    raise InputError(where, " or ".join(errors))


def _convert_literal(value: Any, args: tuple[Any, ...], where: str) -> Any:
    if value not in args:
        choices = ", ".join(repr(a) for a in args)
        raise InputError(where, f"must be one of {choices}, got {value!r}")
    return value


def _convert_enum(value: Any, tp: type[enum.Enum], where: str) -> enum.Enum:
    try:
        return tp(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in tp)
        raise InputError(where, f"must be one of {choices}, got {value!r}") from None


def _convert_bool(value: Any, where: str, meta: Mapping[str, Any]) -> bool:
    if not isinstance(value, bool):
        raise InputError(where, f"expected a boolean, got {type(value).__name__}")
    return value


def _convert_int(value: Any, where: str, meta: Mapping[str, Any]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(where, f"expected an integer, got {value!r}")
    _check_bounds(value, meta, where)
    return value


def _convert_float(value: Any, where: str, meta: Mapping[str, Any]) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(where, f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InputError(where, f"must be a finite number, got {value!r}")
    _check_bounds(number, meta, where)
    return number


def _convert_str(value: Any, where: str, meta: Mapping[str, Any]) -> str:
    if not isinstance(value, str):
        raise InputError(where, f"expected a string, got {type(value).__name__}")
    if meta.get("nonempty") and not value:
        raise InputError(where, "must not be empty")
    return value


# The scalar annotations, matched exactly (``bool`` is not an ``int`` here).
_SCALARS: dict[Any, Callable[[Any, str, Mapping[str, Any]], Any]] = {
    bool: _convert_bool, int: _convert_int, float: _convert_float, str: _convert_str,
}


def _convert_tuple(value: Any, args: tuple[Any, ...], where: str,
                   meta: Mapping[str, Any]) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise InputError(where, f"expected a list, got {type(value).__name__}")
    item_type = args[0]
    return tuple(convert(v, item_type, _join(where, i), meta) for i, v in enumerate(value))


def _convert_dict(value: Any, args: tuple[Any, ...], where: str) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise InputError(where, f"expected a mapping, got {type(value).__name__}")
    key_type, value_type = args
    out = {}
    for k, v in value.items():
        out[convert(k, key_type, where)] = convert(v, value_type, _join(where, str(k)))
    return out


def convert(value: Any, tp: Any, where: str, meta: Mapping[str, Any] | None = None) -> Any:
    """Check ``value`` against the type annotation ``tp`` and return the converted value."""
    meta = meta or {}
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, where, meta)
    if origin is typing.Literal:
        return _convert_literal(value, args, where)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_mapping(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _convert_enum(value, tp, where)
    scalar = _SCALARS.get(tp)
    if scalar is not None:
        return scalar(value, where, meta)
    if origin is tuple:
        return _convert_tuple(value, args, where, meta)
    if origin is dict:
        return _convert_dict(value, args, where)
    raise TypeError(f"{where}: unsupported annotation {tp!r}")  # a programming error


def from_mapping(cls: type[T], data: Any, where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``, strictly."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(where or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise InputError(_join(where, unknown[0]), f"unknown field; known: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        tp = hints[name]
        path = _join(where, name)
        if name in data:
            kwargs[name] = convert(data[name], tp, path, fld.metadata)
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            raise InputError(path, "missing required field")
    try:
        return cls(**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(where or cls.__name__, str(exc)) from None
