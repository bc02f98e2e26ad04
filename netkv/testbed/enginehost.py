"""One GPU host's emulated engines as a service, for the compose testbed.

``netkv testbed engine --host h000 --topology FILE`` runs a ``netkv engine`` (the
OpenAI-compatible, vLLM-protocol engine of :mod:`netkv.engine`) for every instance the topology
places on ``h000``: the k-th instance of the host serves HTTP on ``http_port + k`` and, for a
prefill, its KV side channel on ``kv_port + k``, announced as the host's topology address (the
rack network), so a decode on another host pulls the KV bytes across the shaped rack links.
The P/D proxy (``netkv proxy``) routes requests to these engines.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from netkv.core.prefix_cache import BLOCK_TOKENS
from netkv.core.topology import Instance, Topology
from netkv.engine.model import EngineModel
from netkv.engine.server import Engine, EngineSettings
from netkv.errors import InputError
from netkv.signals import stop_on_signals


@dataclass(frozen=True, slots=True)
class EngineHostSettings:
    host: str
    http_port: int = 9000
    kv_port: int = 9100
    bind: str = "0.0.0.0"  # a container's own interfaces
    bytes_per_token: float = 33.0
    block_size: int = BLOCK_TOKENS

    def __post_init__(self) -> None:
        for name in ("http_port", "kv_port"):
            if not 1 <= getattr(self, name) <= 65000:
                raise InputError(f"--{name.replace('_', '-')}", "must be in 1..65000")


def layout(topology: Topology, host: str) -> list[Instance]:
    """The host's instances in topology order (the k-th gets ``port + k``)."""
    return [i for i in topology.instances if i.host == host]


def engine_urls(topology: Topology, url_for_host: dict[str, str], http_port: int = 9000
                ) -> dict[str, str]:
    """Every instance's base URL: its host's URL with port ``http_port + k``."""
    out: dict[str, str] = {}
    for h in topology.hosts:
        base = urlsplit(url_for_host[h.name])
        for k, inst in enumerate(layout(topology, h.name)):
            netloc = f"{base.hostname}:{(base.port or http_port) + k}"
            out[inst.name] = urlunsplit((base.scheme, netloc, "", "", ""))
    return out


async def serve(settings: EngineHostSettings, topology: Topology,
                stop: asyncio.Event) -> None:
    """Run the host's engines until ``stop`` is set."""
    me = topology.hosts[topology.host_id(settings.host)]
    if not me.address:
        raise InputError(f"hosts.{me.name}.address", "the compose topology needs every "
                         "host's address")
    model = EngineModel(bytes_per_token=settings.bytes_per_token)
    async with contextlib.AsyncExitStack() as stack:
        names = []
        for k, inst in enumerate(layout(topology, me.name)):
            engine = await stack.enter_async_context(Engine(EngineSettings(
                role=inst.role, host=settings.bind, port=settings.http_port + k,
                side_channel_host=me.address, side_channel_port=settings.kv_port + k,
                engine_id=inst.name, block_size=settings.block_size, model=model,
                record_requests=0, stream_interval=16, max_model_len=1 << 21)))
            names.append(f"{inst.name} ({inst.role}) {engine.url}")
        print(f"engine host {me.name}: {', '.join(names)}", flush=True)
        await stop.wait()


def run_forever(settings: EngineHostSettings, topology: Topology) -> int:
    async def main() -> None:
        with stop_on_signals() as stop:
            await serve(settings, topology, stop)

    asyncio.run(main())
    return 0
