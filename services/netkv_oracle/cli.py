"""`netkv oracle`: build the congestion map from agent streams, publish it, serve costs."""

from __future__ import annotations

import argparse
import asyncio

from netkv.config import load_settings
from netkv.core.topology import Topology
from netkv.core.topology_file import load_topology, parse_topology
from netkv.logs import configure_logging
from netkv.signals import stop_on_signals
from netkv_oracle.service import OracleService
from netkv_oracle.settings import OracleSettings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (YAML/JSON) with an `oracle` section")
    parser.add_argument("--topology", help="topology file (default: the built-in fat-tree)")
    parser.add_argument("--http-host", dest="http_host", help="bind address (127.0.0.1)")
    parser.add_argument("--http-port", dest="http_port", type=int, help="HTTP port (8081)")
    parser.add_argument("--oracle-id", dest="oracle_id",
                        help="consumer and leader name (default: host-pid)")
    parser.add_argument("--cluster", action="store_true", default=None,
                        help="redis.url names a Redis Cluster node")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])


def load(args: argparse.Namespace) -> tuple[OracleSettings, Topology]:
    overrides = {k: getattr(args, k) for k in ("topology", "http_host", "http_port",
                                               "oracle_id", "cluster")}
    settings = load_settings(OracleSettings, "oracle", args.config, args.environ, overrides)
    topology = (load_topology(settings.topology) if settings.topology
                else parse_topology({"fat_tree": {}}))
    return settings, topology


async def _serve(settings: OracleSettings, topology: Topology) -> None:
    """Serve until a signal. A background task that dies is logged and turns /healthz and
    /readyz to 503 (the orchestrator's cue to replace this oracle; a standby takes over the
    lead when this one stops renewing it)."""
    with stop_on_signals() as stop:
        async with OracleService(settings, topology):
            await stop.wait()


def run(args: argparse.Namespace) -> int:
    settings, topology = load(args)
    configure_logging(args.log_level)
    asyncio.run(_serve(settings, topology))
    return 0
