"""``netkv proxy --prefill URL[=HOST] ... --decode URL[=HOST] ...``: the P/D proxy.

Binds 127.0.0.1:8000 unless told otherwise and prints ``proxy ready: URL`` once it serves.
With ``--redis-url`` (or ``redis``/``mqtt`` sections in ``--config``) it follows the live
congestion map exactly as the scheduler service does; without, every decision uses the tier
priors of the topology and says so (``x-netkv-map: prior: ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

from aiohttp import web

from netkv import eventloop
from netkv.adapters.topology_file import load_topology
from netkv.core.topology import FabricSpec, Host, Instance, Topology, build_topology
from netkv.http import h1
from netkv.http.openai_errors import openai_error
from netkv.http.server import serving as http_serving
from netkv.logs import configure_logging
from netkv.routing.mapfeed import MapFeed
from netkv.signals import stop_on_signals, wait_for_stop_or_failure
from netkv_proxy.app import Proxy
from netkv_proxy.config import ProxySettings, add_arguments, settings_from
from netkv_proxy.front import json_errors


def configure(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)


def flat_topology(settings: ProxySettings) -> Topology:
    """Without a topology file: every worker host on one leaf (the priors then only tell
    "same host" from "another host")."""
    hosts: dict[str, Host] = {}
    instances: list[Instance] = []
    for role, entries in (("prefill", settings.prefill), ("decode", settings.decode)):
        for i, w in enumerate(entries):
            name = w.host_name
            hosts.setdefault(name, Host(name, "leaf0", "pod0", 8, None))
            instances.append(Instance(f"{role}-{i}", "prefill" if role == "prefill"
                                      else "decode", name, 1))
    return build_topology(list(hosts.values()), instances, FabricSpec())


def topology_for(settings: ProxySettings) -> Topology:
    return load_topology(settings.topology) if settings.topology else flat_topology(settings)


@contextlib.asynccontextmanager
async def serving(settings: ProxySettings, topology: Topology | None = None
                  ) -> AsyncIterator[tuple[Proxy, str]]:
    """Run the proxy on its HTTP port until the block ends; yields it and its URL."""
    topology = topology or topology_for(settings)
    feed = None
    if settings.redis is not None or settings.mqtt is not None:
        feed = MapFeed(topology, settings.redis, settings.mqtt, stale_s=settings.map_stale_s,
                       poll_s=settings.map_poll_s, redis_timeout_s=settings.redis_timeout_s,
                       cache_s=settings.oracle_cache_s)
    async with Proxy(settings, topology, feed) as proxy:
        if settings.front == "h1":
            async with h1.serving(proxy.routes(), settings.host, settings.port,
                                  settings.http_limits(), max_body=settings.max_body_bytes,
                                  errors=json_errors, bad_request=_bad_request) as h1_served:
                proxy.guard = h1_served.guard
                yield proxy, h1_served.urls[0]
        else:
            async with http_serving(proxy.app(), settings.host, settings.port,
                                    settings.http_limits(), handler_cancellation=True,
                                    lingering_time=0.0) as served:
                proxy.guard = served.guard
                yield proxy, served.urls[0]


def _bad_request(status: int, message: str) -> web.Response:
    """A request the h1 front could not parse, in OpenAI's shape."""
    return openai_error(status, message, "InvalidRequestError")


async def serve(settings: ProxySettings) -> int:
    with stop_on_signals() as stop:
        async with serving(settings) as (proxy, url):
            # What start-up made (modules, settings, topology, metrics) lives as long as the
            # process: moved out of the collector's generations, a full collection no longer
            # walks it, so its pause stays short however large the start-up heap was.
            gc.collect()
            gc.freeze()
            print(f"proxy ready: {url} mode={settings.mode} policy={settings.policy} "
                  f"prefill={len(settings.prefill)} decode={len(settings.decode)} "
                  f"loop={eventloop.name_of()} front={settings.front}", flush=True)
            failed = asyncio.ensure_future(proxy.supervisor.wait_failed())
            return 1 if await wait_for_stop_or_failure(stop, failed) else 0


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    configure_logging(settings.log_level)
    return eventloop.run(serve(settings), settings.loop)
