"""The oracle's typed settings (``oracle`` section of the config file plus ``NETKV_*``)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from netkv.config import MqttSettings, Port, RedisSettings, ServiceSettings
from netkv.errors import InputError

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class OracleSettings(ServiceSettings):
    """Where to read samples, how fast measurements age, where to serve.

    ``sample_interval_s`` is the agents' publish interval: a link not refreshed for
    ``stale_intervals`` of them has decayed to the tier prior. ``publish_interval_s`` is the
    most often a new map version is written and announced (only when something changed, or
    every ``republish_s`` so that consumers see the map age).
    """

    SECTION: ClassVar[str] = "oracle"
    redis: RedisSettings = RedisSettings()
    mqtt: MqttSettings = MqttSettings()
    topology: str | None = None  # topology file; the built-in fat-tree when absent
    cluster: bool = False  # redis.url points at a Redis Cluster node
    http_host: str = "127.0.0.1"
    http_port: Port = 8081
    oracle_id: str | None = None  # consumer and leader name; host-pid when absent
    sample_interval_s: Positive = 1.0
    stale_intervals: float = Field(default=3.0, gt=1, allow_inf_nan=False)
    publish_interval_s: Positive = 0.05
    republish_s: Positive = 1.0
    read_count: int = Field(default=512, ge=1)
    read_block_ms: int = Field(default=100, ge=1)
    discover_interval_s: Positive = 1.0
    claim_idle_s: Positive = 5.0
    leader_ttl_s: Positive = 3.0
    min_share: float = Field(default=0.1, gt=0, le=1)
    tomography: bool = True  # localise RTT inflation to unmeasured shared links
    require_registered_nics: bool = False  # reject NIC names absent from the registry

    @model_validator(mode="after")
    def _leader_outlives_publishing(self) -> OracleSettings:
        if self.leader_ttl_s <= 2 * self.publish_interval_s:
            raise InputError("leader_ttl_s", f"must exceed twice publish_interval_s "
                             f"({self.publish_interval_s}), got {self.leader_ttl_s}")
        return self

    @property
    def fresh_s(self) -> float:
        return self.sample_interval_s * 1.5

    @property
    def stale_s(self) -> float:
        return max(self.sample_interval_s * self.stale_intervals, self.fresh_s * 1.01)
