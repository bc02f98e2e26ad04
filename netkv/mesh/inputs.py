"""`netkv up`'s inputs, checked before anything starts: loopback addresses, the broker and
Redis URLs (the password split out of what is shown), the fixed ports, private files."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from netkv.core.topology import Topology
from netkv.errors import InputError
from netkv.mesh.children import MeshError, port_taken


def agent_addresses(topology: Topology) -> dict[str, str]:
    """Each host's loopback address: its topology address if it is one, else 127.0.0.11+."""
    out: dict[str, str] = {}
    for i, host in enumerate(topology.hosts):
        address = host.address
        if address is None or not ipaddress.ip_address(address).is_loopback:
            address = str(ipaddress.IPv4Address("127.0.0.11") + i)
        out[host.name] = address
    return out


def mqtt_endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise InputError("--mqtt-url", f"expected mqtt://host:port, got {url!r}")
    return parts.hostname, parts.port or 1883


def split_redis_url(url: str) -> tuple[dict[str, Any], str]:
    """``--redis-url`` -> (the config's redis section, the URL as printed, redacted)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise InputError("--redis-url", "expected redis://[:password@]host:port/db")
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    bare = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    section: dict[str, Any] = {"url": bare}
    if parts.password:
        section["password"] = parts.password
    if parts.username:
        section["username"] = parts.username
    shown = bare if not parts.password else bare.replace("://", f"://{parts.username or ''}:***@")
    return section, shown


def check_ports(args: argparse.Namespace, agents: Mapping[str, str]) -> None:
    """Fail before starting anything if a fixed port is taken: one line naming it."""
    wanted = [("scheduler", "--scheduler-port", args.scheduler_port),
              ("oracle", "--oracle-port", args.oracle_port)]
    if not args.no_standby:
        wanted.append(("standby oracle", "--oracle-port + 1", args.oracle_port + 1))
    for name, flag, port in wanted:
        if port_taken("127.0.0.1", port):
            raise MeshError(f"port {port} on 127.0.0.1 ({name}) is already in use; stop what "
                            f"holds it or choose another with {flag}")
    for host, address in agents.items():
        if port_taken(address, args.echo_port, socket.SOCK_DGRAM):
            raise MeshError(f"UDP port {args.echo_port} on {address} (agent {host}'s echo) is "
                            "already in use; stop what holds it or choose another with "
                            "--echo-port")


def private_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)
    return path


def workdir(given: str | None) -> Path:
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        return path
    return Path(tempfile.mkdtemp(prefix=f"netkv-up-{time.strftime('%Y%m%d-%H%M%S')}-"))
