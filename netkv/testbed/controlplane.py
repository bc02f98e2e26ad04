"""The real NetKV mesh on the emulated fabric: Redis, Mosquitto, the oracle and the scheduler
in the control namespace; an agent in every host namespace and every switch namespace.

Host agents read their ``eth0`` counters (``<host>/nic/up|down``) and probe their peers' data
addresses; switch agents (identity ``<leaf>`` or ``<pod>``) read the switch's uplink port,
registered as ``uplink_nic`` (transmit: ``<switch>/up`` and its tbf backlog; receive:
``<switch>/down``), standing in for the telemetry (port counters, queue depth) a real switch
exports. Every interface's speed is configured to its emulated rate
(sysfs says 10 Gb/s for a veth). All processes run via :meth:`Lab.spawn`, so teardown stops
them. The control plane sees the *scaled* topology and a KV size per token scaled the same way
(the scheduler's ``kv_bytes_per_token`` setting), so its predicted seconds are the testbed's
real seconds.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml
from netkv_agent.settings import AgentSettings

from netkv.localservers import (
    MosquittoServer,
    RedisServer,
    ServerError,
    wait_for_port,
    wait_http_ready,
)
from netkv.testbed.fabric import CONTROL_ADDRESS, UPLINK, FabricPlan
from netkv.testbed.netns import Lab, stop_pids

log = structlog.get_logger(__name__)

REDIS_PORT = 6379
MQTT_PORT = 1883
ORACLE_PORT = 8091
SCHEDULER_PORT = 8090


@dataclass(frozen=True, slots=True)
class Tuning:
    """Agent and oracle cadences for the testbed (fast enough to see a hot spot in ~1 s)."""

    counter_interval_s: float = 0.25
    publish_interval_s: float = 0.25
    probe_interval_leaf_s: float = 0.2
    probe_interval_pod_s: float = 0.3
    probe_interval_core_s: float = 0.3

    @classmethod
    def agent_defaults(cls) -> Tuning:
        """The agent's own default cadences (what a deployment runs with), for measuring
        how fast a fault is seen "at the default probe and counter intervals"."""
        a = AgentSettings(agent_id="defaults")
        return cls(a.counter_interval_s, a.publish_interval_s, a.probe_interval_leaf_s,
                   a.probe_interval_pod_s, a.probe_interval_core_s)


class ControlPlane:
    """Starts and restarts the mesh's processes inside a :class:`Lab`."""

    def __init__(self, lab: Lab, plan: FabricPlan, workdir: Path, *, bytes_per_token: int,
                 tuning: Tuning | None = None, agents: bool = True) -> None:
        self.lab, self.plan, self.workdir = lab, plan, workdir
        self.bytes_per_token = bytes_per_token
        self.tuning = tuning or Tuning()
        self.with_agents = agents
        self.topology_path = workdir / "topology.yaml"
        self.config_path = workdir / "netkv.yaml"
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.oracle: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self._adopted_pid = 0
        self.map_wait_s = 15.0
        self.scheduler_url = f"http://{CONTROL_ADDRESS}:{SCHEDULER_PORT}"
        self.oracle_url = f"http://{CONTROL_ADDRESS}:{ORACLE_PORT}"

    # -- configuration ------------------------------------------------------------------
    def shared_config(self) -> dict[str, Any]:
        return {
            "redis": {"url": f"redis://{CONTROL_ADDRESS}:{REDIS_PORT}/0"},
            "mqtt": {"host": CONTROL_ADDRESS, "port": MQTT_PORT},
            "topology": str(self.topology_path),
        }

    def write_configs(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.plan.write_topology(self.topology_path)
        config = self.shared_config() | {
            "oracle": {"http_host": CONTROL_ADDRESS, "http_port": ORACLE_PORT,
                       "sample_interval_s": self.tuning.publish_interval_s * 2},
            # The namespaces' private control network this testbed made (198.18.0.0/15).
            "scheduler": {"host": CONTROL_ADDRESS, "port": SCHEDULER_PORT,
                          "allow_unauthenticated": True,
                          "kv_bytes_per_token": self.bytes_per_token},
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def agent_config(self, agent_id: str) -> dict[str, Any]:
        """One agent's config: a host agent on ``eth0`` or a switch agent on its uplink port."""
        t, plan = self.plan, self.plan
        tune = self.tuning
        base: dict[str, Any] = {
            "agent_id": agent_id,
            "counter_interval_s": tune.counter_interval_s,
            "publish_interval_s": tune.publish_interval_s,
            "probe_interval_leaf_s": tune.probe_interval_leaf_s,
            "probe_interval_pod_s": tune.probe_interval_pod_s,
            "probe_interval_core_s": tune.probe_interval_core_s,
            "rdma_enabled": False,
        }
        if agent_id in plan.host_ns:
            rate = t.rate_bps(f"{agent_id}/nic/up") / 1e9
            base |= {"listen_address": plan.host_addr[agent_id], "fabric_nic": "eth0",
                     "nic_speed_gbps": {"eth0": rate}}
        else:
            ns = plan.switch_ns[agent_id]
            rate = t.rate_bps(f"{agent_id}/up") / 1e9
            base |= {"listen_address": plan.mgmt_addr[ns], "uplink_nic": UPLINK,
                     "nic_speed_gbps": {UPLINK: rate}}
        return self.shared_config() | {"agent": base}

    # -- processes -------------------------------------------------------------------------
    def _netkv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "netkv.cli", *args]

    async def start(self) -> None:
        """Redis and Mosquitto, then the oracle, the agents and the scheduler; returns once
        the scheduler answers ``/readyz`` (or raises after a bounded wait)."""
        self.write_configs()
        ctl = self.plan.control_ns
        logs = self.workdir / "logs"
        redis = RedisServer(CONTROL_ADDRESS, REDIS_PORT, self.workdir / "redis")
        self.lab.spawn(ctl, redis.command(), logs / "redis.log", infrastructure=True)
        mosquitto = MosquittoServer(CONTROL_ADDRESS, MQTT_PORT, self.workdir / "mosquitto")
        self.lab.spawn(ctl, mosquitto.command(), logs / "mosquitto.log", infrastructure=True)
        await wait_for_port(CONTROL_ADDRESS, REDIS_PORT)
        await wait_for_port(CONTROL_ADDRESS, MQTT_PORT)
        self.oracle = self.lab.spawn(ctl, self._netkv("oracle", "--config",
                                                      str(self.config_path)),
                                     logs / "oracle.log")
        if self.with_agents:
            for agent_id in [*self.plan.host_ns, *self.plan.switch_ns]:
                if agent_id == "core":
                    continue
                path = self.workdir / "agents" / f"{agent_id}.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(yaml.safe_dump(self.agent_config(agent_id)))
                ns = self.plan.host_ns.get(agent_id) or self.plan.switch_ns[agent_id]
                self.agents[agent_id] = self.lab.spawn(
                    ns, self._netkv("agent", "--config", str(path)),
                    logs / f"agent-{agent_id}.log")
        await self.start_scheduler()

    async def start_scheduler(self) -> None:
        ctl = self.plan.control_ns
        self.scheduler = self.lab.spawn(
            ctl, self._netkv("scheduler", "--config", str(self.config_path)),
            self.workdir / "logs" / "scheduler.log")
        await self.wait_ready(self.scheduler_url + "/healthz", self.scheduler)
        try:  # ready = it holds a congestion map; without one it decides on tier priors
            await self.wait_ready(self.scheduler_url + "/readyz", self.scheduler,
                                  timeout_s=self.map_wait_s)
        except RuntimeError as exc:
            log.warning("testbed.scheduler_without_map", error=str(exc))

    def adopt_scheduler(self, pid: int) -> None:
        """Take over the scheduler a previous ``up`` started (to restart it per policy)."""
        self._adopted_pid = pid

    async def restart_scheduler(self) -> None:
        """A fresh scheduler (no bookings, no prefix index) on the same address."""
        if self._adopted_pid:
            stop_pids([self._adopted_pid])
            self._adopted_pid = 0
        if self.scheduler is not None:
            self.scheduler.terminate()
            try:
                self.scheduler.wait(5.0)
            except subprocess.TimeoutExpired:
                self.scheduler.kill()
                self.scheduler.wait(2.0)
        await self.start_scheduler()

    async def wait_ready(self, url: str, proc: subprocess.Popen[bytes] | None,
                         timeout_s: float = 60.0) -> None:
        try:
            await wait_http_ready(url, proc.poll if proc is not None else None, timeout_s)
        except ServerError as exc:
            raise RuntimeError(f"{exc}; see {self.workdir / 'logs'}") from None



async def port_open(port: int) -> None:
    await wait_for_port(CONTROL_ADDRESS, port, timeout_s=10.0)
