"""``netkv agent``: run one host agent, or check that one is alive (``--check``).

Configuration: ``--config FILE`` (section ``agent`` plus the shared ``redis``, ``mqtt`` and
``topology`` sections), ``NETKV_*`` environment variables (``NETKV_AGENT_ID``,
``NETKV_REDIS__URL``, ...), then these flags. ``--check`` exits 0 when the agent's heartbeat
is present in Redis (a container healthcheck), 1 otherwise. SIGTERM and SIGINT shut the agent
down cleanly (final flush, ``offline`` on MQTT); ``--run-for`` bounds the run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from redis.exceptions import RedisError

from netkv.adapters.redis_client import connect_redis
from netkv.contracts.names import RedisKeys
from netkv.core.topology_file import load_topology
from netkv.logs import configure_logging
from netkv.signals import stop_on_signals, wait_for_stop_or_failure
from netkv_agent.agent import Agent
from netkv_agent.settings import AgentSettings, load_agent_settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (YAML/JSON) with an 'agent' section")
    parser.add_argument("--agent-id", help="this agent's topology node name (e.g. h003)")
    parser.add_argument("--listen-address", help="address the echo responder binds "
                        "(the agent's own address; default 127.0.0.1)")
    parser.add_argument("--advertise-address", help="address peers probe, if not the listen "
                        "address")
    parser.add_argument("--echo-port", type=int, help="UDP echo port (0: any free port)")
    parser.add_argument("--topology", help="topology file (hosts, leaves, pods)")
    parser.add_argument("--redis-url", help="redis://host:port/db")
    parser.add_argument("--mqtt-host", help="MQTT broker host")
    parser.add_argument("--mqtt-port", type=int, help="MQTT broker port")
    parser.add_argument("--fabric-nic", help="interface carrying KV traffic (<host>/nic/up|down)")
    parser.add_argument("--uplink-nic",
                        help="a switch agent's port to its parent switch (<switch>/up|down)")
    parser.add_argument("--run-for", type=float, metavar="SECONDS",
                        help="stop after SECONDS (default: run until SIGTERM/SIGINT)")
    parser.add_argument("--check", action="store_true",
                        help="exit 0 if this agent's heartbeat is in Redis, else 1")


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    overrides: dict[str, Any] = {
        "agent_id": args.agent_id, "listen_address": args.listen_address,
        "advertise_address": args.advertise_address, "echo_port": args.echo_port,
        "topology": args.topology, "fabric_nic": args.fabric_nic,
        "uplink_nic": args.uplink_nic,
    }
    # Flags beat the environment and the file; a nested flag overrides only its own field
    # (pydantic-settings merges the sources field by field).
    redis = {"url": args.redis_url} if args.redis_url else {}
    mqtt = {k: v for k, v in (("host", args.mqtt_host), ("port", args.mqtt_port))
            if v is not None}
    nested = {k: v for k, v in (("redis", redis), ("mqtt", mqtt)) if v}
    return load_agent_settings(args.config, args.environ, overrides | nested)


async def check(settings: AgentSettings) -> int:
    """0 when the agent's heartbeat key exists (it published within its TTL)."""
    keys = RedisKeys(settings.redis.prefix)
    try:
        async with connect_redis(settings.redis, retries=0) as redis:
            async with asyncio.timeout(settings.redis_op_timeout_s):
                beat = await redis.get(keys.heartbeat(settings.agent_id))
    except (RedisError, OSError, TimeoutError) as exc:
        print(f"netkv agent --check: redis unavailable: {exc}")
        return 1
    if beat is None:
        print(f"netkv agent --check: no heartbeat from {settings.agent_id}")
        return 1
    print(f"netkv agent --check: {settings.agent_id} alive (heartbeat {beat!r})")
    return 0


async def serve(settings: AgentSettings, run_for: float | None) -> int:
    """Run until a signal (or ``run_for``); 1 if a background task died (it is logged)."""
    topology = load_topology(settings.topology) if settings.topology else None
    with stop_on_signals() as stop:
        async with Agent(settings, topology) as agent:
            died = await wait_for_stop_or_failure(
                stop, asyncio.ensure_future(agent.wait_failed()), run_for)
    if died:
        print(f"netkv agent: stopped because a background task died: {agent.failures[0]}",
              file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    configure_logging()
    settings = settings_from_args(args)
    if args.check:
        return asyncio.run(check(settings))
    return asyncio.run(serve(settings, args.run_for))
