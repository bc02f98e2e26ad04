"""The agent's typed, frozen configuration, validated once at start-up.

Load it with :func:`load_agent_settings` (file section ``agent`` + the shared ``redis``,
``mqtt`` and ``topology`` sections + ``NETKV_*`` variables + CLI flags), or build
:class:`AgentSettings` directly in tests and benchmarks.

How NICs map to topology links (the oracle translates with the agent's registration):

* ``fabric_nic`` names the host's interface that carries KV traffic. Its transmit counters
  describe the directed link ``<host>/nic/up`` and its receive counters ``<host>/nic/down``.
* ``uplink_nic`` is the switch counterpart: a switch agent (identity a leaf or pod) names its
  port toward the parent switch, whatever the interface is called. Its transmit counters
  describe ``<switch>/up`` and its receive counters ``<switch>/down`` (the port receives
  what the parent sends down), so one port reports both directions of the switch's links.
* ``nic_links`` binds any other interface explicitly, ``{ifname: {tx: LINK, rx: LINK}}``
  (e.g. a switch with a LAG of several uplink ports). Every bound link must be owned by the
  agent's identity; the agent checks at start-up and the oracle again on every registration.
* ``rdma_fabric_port`` (``mlx5_0/1``) says which RDMA port carries the same traffic as the
  fabric NIC; its samples map to the same two links.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from netkv.config import MqttSettings, RedisSettings, ServiceSettings, load_settings
from netkv.errors import InputError


@dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class NicBinding:
    """Which directed topology links an interface's transmit and receive counters describe."""

    tx: Annotated[str, Field(min_length=1)]
    rx: Annotated[str, Field(min_length=1)]


class AgentSettings(ServiceSettings):
    """Everything one agent needs. Intervals are seconds; rates Gb/s as operators quote them."""

    SECTION: ClassVar[str] = "agent"
    agent_id: str = Field(default="", min_length=1)
    listen_address: str = "127.0.0.1"  # the echo responder binds here (the agent's own address)
    advertise_address: str | None = None  # what peers should probe; default listen_address
    echo_port: int = Field(default=0, ge=0, le=65535)  # 0: any free port
    topology: str | None = None  # topology file path (shared section)
    redis: RedisSettings = RedisSettings()
    mqtt: MqttSettings = MqttSettings()
    mqtt_enabled: bool = True

    # -- RTT probing -----------------------------------------------------------------------
    probe_interval_leaf_s: float = Field(default=0.1, gt=0, le=3600, allow_inf_nan=False)
    probe_interval_pod_s: float = Field(default=0.5, gt=0, le=3600, allow_inf_nan=False)
    probe_interval_core_s: float = Field(default=1.0, gt=0, le=3600, allow_inf_nan=False)
    probe_timeout_s: float = Field(default=1.0, gt=0, le=60, allow_inf_nan=False)
    echo_tick_s: float = Field(default=0.1, gt=0, le=1, allow_inf_nan=False)  # echo cadence
    pod_fanout: int = Field(default=2, ge=0)  # peers per other leaf in the pod
    core_fanout: int = Field(default=4, ge=0)  # peers across the core, total
    pinglist_rotate_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    rtt_window_s: float = Field(default=5.0, gt=0, le=3600, allow_inf_nan=False)
    max_peers: int = Field(default=1024, ge=1)

    # -- counters --------------------------------------------------------------------------
    # read at publish ticks, so at most as often as publish_interval_s
    counter_interval_s: float = Field(default=0.5, gt=0, le=3600, allow_inf_nan=False)
    nics: tuple[str, ...] = ()  # interfaces to read; the fabric NIC is always included
    fabric_nic: str | None = None  # a host's KV interface: <host>/nic/up|down
    uplink_nic: str | None = None  # a switch's port to its parent: <switch>/up|down
    nic_links: dict[str, NicBinding] = Field(default_factory=dict)
    nic_speed_gbps: dict[str, float] = Field(default_factory=dict)  # overrides sysfs speed
    netns: str | None = None  # read netlink counters inside this named namespace
    qdisc_enabled: bool = True
    sysfs_net_root: str = "/sys/class/net"
    rdma_enabled: bool = True
    rdma_sysfs_root: str = "/sys/class/infiniband"
    rdma_devices: tuple[str, ...] = ()  # empty: every device under the root
    rdma_fabric_port: str | None = None  # "mlx5_0/1"
    rdma_data_unit_bytes: int = Field(default=4, ge=1, le=8)

    # -- publishing ------------------------------------------------------------------------
    publish_interval_s: float = Field(default=0.25, gt=0, le=60, allow_inf_nan=False)
    heartbeat_interval_s: float = Field(default=1.0, gt=0, le=60, allow_inf_nan=False)
    heartbeat_ttl_s: int = Field(default=5, ge=1)
    stream_maxlen: int = Field(default=1000, ge=10)
    max_buffered_batches: int = Field(default=240, ge=1)
    max_batch_samples: int = Field(default=1024, ge=1, le=4096)
    redis_op_timeout_s: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    reconnect_max_backoff_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    registry_refresh_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)

    # -- active bandwidth probe (off by default) ------------------------------------------
    bandwidth_probe_enabled: bool = False
    bandwidth_port: int = Field(default=0, ge=0, le=65535)
    bandwidth_probe_interval_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    bandwidth_probe_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    bandwidth_probe_rate_mbps: float = Field(default=100.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _consistent(self) -> AgentSettings:
        if self.probe_timeout_s <= 2 * self.echo_tick_s:
            raise InputError("probe_timeout_s", f"must exceed twice echo_tick_s "
                             f"({2 * self.echo_tick_s:g} s): a responder answers within one "
                             f"tick and the prober reads within the next")
        if self.rdma_fabric_port is not None:
            device, _, port = self.rdma_fabric_port.partition("/")
            if not device or not port.isdigit():
                raise InputError("rdma_fabric_port",
                                 f"expected DEVICE/PORT such as mlx5_0/1, got "
                                 f"{self.rdma_fabric_port!r}")
        if self.fabric_nic and self.uplink_nic:
            raise InputError("uplink_nic", "an agent is a host (fabric_nic) or a switch "
                             "(uplink_nic), not both")
        for name, gbps in self.nic_speed_gbps.items():
            if not gbps > 0:
                raise InputError(f"nic_speed_gbps.{name}", f"must be > 0, got {gbps!r}")
        return self

    @property
    def address(self) -> str:
        """The address peers probe."""
        return self.advertise_address or self.listen_address

    @property
    def interfaces(self) -> tuple[str, ...]:
        """Every interface whose counters are read (configured, fabric and bound ones)."""
        names = list(self.nics)
        for extra in (self.fabric_nic, self.uplink_nic, *self.nic_links):
            if extra and extra not in names:
                names.append(extra)
        return tuple(names)


def load_agent_settings(path: str | Path | None, env: Mapping[str, str],
                        overrides: Mapping[str, Any] | None = None) -> AgentSettings:
    """Settings from a config file, ``NETKV_*`` variables and CLI overrides (in that order)."""
    return load_settings(AgentSettings, "agent", path, env, overrides)
