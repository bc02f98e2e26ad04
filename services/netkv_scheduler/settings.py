"""Typed, frozen scheduler settings, loaded once from the ``scheduler`` config section.

pydantic-settings (:mod:`netkv.config`): the shared ``redis``, ``mqtt`` and ``topology``
sections of the config file are merged in by :func:`netkv.config.load_settings`; ``NETKV_*``
variables and CLI flags override the file.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, SecretStr, field_validator, model_validator

from netkv.config import (
    KvSizeSettings,
    LogLevel,
    MqttSettings,
    PolicyName,
    Port,
    Positive,
    RedisSettings,
    ServiceSettings,
    load_settings,
)
from netkv.errors import InputError
from netkv.http.server import HttpLimitsSettings
from netkv.routing.selector import SelectorConfig


def is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost`` (a name that resolves elsewhere is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _not_empty_token(value: SecretStr | None) -> SecretStr | None:
    if value is not None and not value.get_secret_value():
        raise ValueError("must not be empty (omit it to disable auth)")
    return value


def demo_topology_path() -> str:
    """The topology file shipped with the package (used when none is configured)."""
    return str(resources.files("netkv") / "data" / "topology-demo.yaml")


class SchedulerSettings(ServiceSettings, KvSizeSettings, HttpLimitsSettings):
    """Everything the scheduler service needs; defaults work on one machine.

    ``token`` (when set) is required as ``Authorization: Bearer <token>`` on the mutating
    endpoints (select, release, instance registration). ``map_stale_s`` is the age past which
    the congestion map is ignored in favour of the tier priors. ``model`` and
    ``kv_bytes_per_token``: :class:`~netkv.config.KvSizeSettings`; the client-side HTTP limits
    (``header_timeout_s``, ``body_timeout_s``, ``keepalive_timeout_s``, ``max_connections``):
    :class:`~netkv.http.server.HttpLimitsSettings`.
    """

    SECTION: ClassVar[str] = "scheduler"
    host: str = "127.0.0.1"
    port: Port = 8090
    topology: str | None = None
    redis: RedisSettings = RedisSettings()
    mqtt: MqttSettings = MqttSettings()
    policy: PolicyName = "netkv"
    policy_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    capacity_tokens: Positive = 500_000.0
    prefix_blocks: int = Field(default=200_000, ge=0)
    token: SecretStr | None = None
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_block_hashes: int = Field(default=65536, ge=1)
    max_connections: int = Field(default=4096, ge=16)  # capped below the file limit
    # Listening off loopback without a token is refused unless this says so explicitly (a
    # testbed's private namespace network, say); never the default.
    allow_unauthenticated: bool = False
    max_registered: int = Field(default=256, ge=0)  # instances registered over HTTP, at most
    registration_ttl_s: Positive = 60.0  # a registered instance expires unless refreshed
    agent_silent_s: Positive = 10.0  # an agent heard before, silent this long: degraded
    scrape_allow: tuple[str, ...] = ()  # metrics_url hosts allowed besides the instance's own
    max_scrape_bytes: int = Field(default=1 << 20, ge=1024)
    reservation_ttl_s: Positive = 60.0
    map_stale_s: Positive = 10.0
    map_poll_s: Positive = 2.0
    redis_timeout_s: Positive = 1.0
    scrape_interval_s: Positive = 2.0
    scrape_timeout_s: Positive = 1.0
    oracle_cache_s: float = Field(default=0.5, ge=0, allow_inf_nan=False)
    log_level: LogLevel = "info"

    _token = field_validator("token")(_not_empty_token)

    @model_validator(mode="after")
    def _credential_off_loopback(self) -> SchedulerSettings:
        if self.token is None and not is_loopback(self.host) \
                and not self.allow_unauthenticated:
            raise InputError("token", f"required when listening on {self.host!r} (anything "
                             "but loopback): anyone who can reach the port could register "
                             "decoders and steer decisions; set NETKV_TOKEN, listen on "
                             "127.0.0.1, or (a private test network only) set "
                             "allow_unauthenticated")
        return self

    def selector_config(self) -> SelectorConfig:
        """The routing part of these settings (:mod:`netkv.routing` takes no settings type)."""
        return SelectorConfig(bytes_per_token=self.bytes_per_token, policy=self.policy,
                              policy_params=self.policy_params,
                              capacity_tokens=self.capacity_tokens,
                              prefix_blocks=self.prefix_blocks,
                              reservation_ttl_s=self.reservation_ttl_s,
                              max_registered=self.max_registered,
                              registration_ttl_s=self.registration_ttl_s,
                              scrape_allow=self.scrape_allow)

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
