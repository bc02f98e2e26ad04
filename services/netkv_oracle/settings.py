"""The oracle's typed settings (``oracle`` section of the config file plus ``NETKV_*``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from netkv.config import MqttSettings, RedisSettings
from netkv.errors import InputError
from netkv.fields import bound


@dataclass(frozen=True, slots=True)
class OracleSettings:
    """Where to read samples, how fast measurements age, where to serve.

    ``sample_interval_s`` is the agents' publish interval: a link not refreshed for
    ``stale_intervals`` of them has decayed to the tier prior. ``publish_interval_s`` is the
    most often a new map version is written and announced (only when something changed, or
    every ``republish_s`` so that consumers see the map age).
    """

    redis: RedisSettings = RedisSettings()
    mqtt: MqttSettings = MqttSettings()
    topology: str | None = None  # topology file; the built-in fat-tree when absent
    cluster: bool = False  # redis.url points at a Redis Cluster node
    http_host: str = "127.0.0.1"
    http_port: int = field(default=8081, metadata=bound(ge=0, le=65535))
    oracle_id: str | None = None  # consumer and leader name; host-pid when absent
    sample_interval_s: float = field(default=1.0, metadata=bound(gt=0))
    stale_intervals: float = field(default=3.0, metadata=bound(gt=1))
    publish_interval_s: float = field(default=0.05, metadata=bound(gt=0))
    republish_s: float = field(default=1.0, metadata=bound(gt=0))
    read_count: int = field(default=512, metadata=bound(ge=1))
    read_block_ms: int = field(default=100, metadata=bound(ge=1))
    discover_interval_s: float = field(default=1.0, metadata=bound(gt=0))
    claim_idle_s: float = field(default=5.0, metadata=bound(gt=0))
    leader_ttl_s: float = field(default=3.0, metadata=bound(gt=0))
    min_share: float = field(default=0.1, metadata=bound(gt=0, le=1))
    tomography: bool = True  # localise RTT inflation to unmeasured shared links
    require_registered_nics: bool = False  # reject NIC names absent from the registry

    def __post_init__(self) -> None:
        if self.leader_ttl_s <= 2 * self.publish_interval_s:
            raise InputError("leader_ttl_s", f"must exceed twice publish_interval_s "
                             f"({self.publish_interval_s}), got {self.leader_ttl_s}")

    @property
    def fresh_s(self) -> float:
        return self.sample_interval_s * 1.5

    @property
    def stale_s(self) -> float:
        return max(self.sample_interval_s * self.stale_intervals, self.fresh_s * 1.01)
