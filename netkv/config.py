"""Typed, frozen settings shared by the services, loaded once at start-up.

A config file (YAML or JSON) has top-level sections: the shared ``redis`` and ``mqtt``
endpoints, ``topology`` (a path), and one section per service (``agent``, ``oracle``,
``scheduler``). :func:`load_settings` merges the shared sections into the service's section,
applies ``NETKV_*`` environment overrides, and validates the lot strictly. Nothing below the
CLI reads ``os.environ``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from netkv.errors import InputError
from netkv.fields import bound, from_mapping

T = TypeVar("T")

SHARED_SECTIONS = ("redis", "mqtt", "topology")


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where the telemetry store is and how to log in. ``prefix`` starts every key."""

    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    prefix: str = "netkv:"
    timeout_s: float = field(default=2.0, metadata=bound(gt=0))

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise InputError("redis.url", f"must start with redis://, rediss:// or unix://, "
                             f"got {self.url!r}")
        if not self.prefix or not self.prefix.endswith(":"):
            raise InputError("redis.prefix", f"must be non-empty and end with ':', "
                             f"got {self.prefix!r}")


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Where the event bus is and how to log in. ``prefix`` starts every topic."""

    host: str = "127.0.0.1"
    port: int = field(default=1883, metadata=bound(ge=1, le=65535))
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    prefix: str = "netkv/v1/"
    keepalive_s: int = field(default=10, metadata=bound(ge=1))

    def __post_init__(self) -> None:
        if not self.prefix.endswith("/") or any(c in self.prefix for c in "+#"):
            raise InputError("mqtt.prefix", f"must end with '/' and hold no wildcards, "
                             f"got {self.prefix!r}")


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The raw mapping in a config file (empty when no file is given)."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(str(path), f"cannot read config file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError(str(path), f"not valid YAML/JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(str(path), "the config file must hold a mapping of sections")
    return data


def load_settings(
    cls: type[T], section: str, path: str | Path | None, env: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build a service's settings from file section + shared sections + env + CLI overrides.

    Precedence, lowest first: the file, then ``NETKV_*`` variables, then ``overrides`` (flags
    the user typed). Errors name the file (or variable) and the field.
    """
    data = read_config_file(path)
    body = data.get(section) or {}
    if not isinstance(body, dict):
        raise InputError(f"{path}: {section}", "must be a mapping")
    merged = {k: v for k, v in data.items() if k in SHARED_SECTIONS} | body
    fields = getattr(cls, "__dataclass_fields__", {})
    merged = {k: v for k, v in merged.items() if k in fields or k in body}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged |= given
    env = {k: v for k, v in env.items() if k.removeprefix("NETKV_").lower() not in given}
    where = f"{path}: {section}" if path else section
    try:
        return from_mapping(cls, merged, "", env)
    except InputError as exc:
        raise InputError(f"{where}.{exc.where}" if not exc.where.startswith("NETKV_")
                         else exc.where, exc.message) from None
