"""Typed, frozen scheduler settings, loaded once from the ``scheduler`` config section.

The shared ``redis``, ``mqtt`` and ``topology`` sections of the config file are merged in by
:func:`netkv.config.load_settings`; ``NETKV_*`` variables and CLI flags override the file.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from netkv.config import MqttSettings, RedisSettings, load_settings
from netkv.core.kvsize import PRESETS
from netkv.errors import InputError
from netkv.fields import bound
from netkv.routing.selector import SelectorConfig


def demo_topology_path() -> str:
    """The topology file shipped with the package (used when none is configured)."""
    return str(resources.files("netkv") / "data" / "topology-demo.yaml")


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """Everything the scheduler service needs; defaults work on one machine.

    ``token`` (when set) is required as ``Authorization: Bearer <token>`` on the mutating
    endpoints (select, release, instance registration). ``map_stale_s`` is the age past which
    the congestion map is ignored in favour of the tier priors. ``kv_bytes_per_token``, when
    set, overrides the ``model`` preset's KV size (a deployment whose transfers move other
    bytes: a quantised cache, or a testbed that scales bytes with its link rates).
    """

    host: str = "127.0.0.1"
    port: int = field(default=8090, metadata=bound(ge=0, le=65535))
    topology: str | None = None
    redis: RedisSettings = RedisSettings()
    mqtt: MqttSettings = MqttSettings()
    policy: str = "netkv"
    policy_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    capacity_tokens: float = field(default=500_000.0, metadata=bound(gt=0))
    prefix_blocks: int = field(default=200_000, metadata=bound(ge=0))
    model: str = "llama3-70b"
    kv_bytes_per_token: float | None = field(default=None, metadata=bound(gt=0))
    token: str | None = None
    max_body_bytes: int = field(default=1 << 20, metadata=bound(ge=1024))
    max_block_hashes: int = field(default=65536, metadata=bound(ge=1))
    reservation_ttl_s: float = field(default=60.0, metadata=bound(gt=0))
    map_stale_s: float = field(default=10.0, metadata=bound(gt=0))
    map_poll_s: float = field(default=2.0, metadata=bound(gt=0))
    redis_timeout_s: float = field(default=1.0, metadata=bound(gt=0))
    scrape_interval_s: float = field(default=2.0, metadata=bound(gt=0))
    scrape_timeout_s: float = field(default=1.0, metadata=bound(gt=0))
    oracle_cache_s: float = field(default=0.5, metadata=bound(ge=0))
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.model not in PRESETS:
            raise InputError("scheduler.model", f"unknown model {self.model!r}; known: "
                             f"{', '.join(sorted(PRESETS))}")
        if self.kv_bytes_per_token is not None and not (
                math.isfinite(self.kv_bytes_per_token) and self.kv_bytes_per_token > 0):
            raise InputError("scheduler.kv_bytes_per_token",
                             f"must be a finite number > 0, got {self.kv_bytes_per_token!r}")
        if self.token is not None and not self.token:
            raise InputError("scheduler.token", "must not be empty (omit it to disable auth)")

    @property
    def bytes_per_token(self) -> float:
        """KV bytes a transfer moves per prompt token (the override, else the preset's)."""
        if self.kv_bytes_per_token is not None:
            return float(self.kv_bytes_per_token)
        return float(PRESETS[self.model].bytes_per_token)

    def selector_config(self) -> SelectorConfig:
        """The routing part of these settings (:mod:`netkv.routing` takes no settings type)."""
        return SelectorConfig(bytes_per_token=self.bytes_per_token, policy=self.policy,
                              policy_params=self.policy_params,
                              capacity_tokens=self.capacity_tokens,
                              prefix_blocks=self.prefix_blocks,
                              reservation_ttl_s=self.reservation_ttl_s)

    @property
    def topology_path(self) -> str:
        return self.topology or demo_topology_path()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI flags that override the config file (only the ones an operator types often)."""
    parser.add_argument("--config", help="config file (YAML/JSON) with a scheduler section")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8090; 0 = any free)")
    parser.add_argument("--topology", help="topology file (default: the shipped demo topology)")
    parser.add_argument("--policy", help="default policy name (default netkv)")


def settings_from_args(args: argparse.Namespace) -> SchedulerSettings:
    overrides: Mapping[str, Any] = {k: getattr(args, k, None)
                                    for k in ("host", "port", "topology", "policy")}
    config = getattr(args, "config", None)
    return load_settings(SchedulerSettings, "scheduler", Path(config) if config else None,
                         args.environ, overrides)
