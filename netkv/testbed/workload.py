"""The compose testbed's one-shot workload: replay a trace slice once per policy through
``netkv proxy`` in front of the engine hosts, and print the comparison table.

The proxy runs in this process (fresh for every policy: no booking or prefix index carries
over), follows the congestion map from the compose testbed's Redis and broker, and routes to
the hosts' ``netkv engine`` instances; the KV bytes go from the prefill's host to the decode's
host across the shaped rack links. Without the trace file (it is not shipped with the project)
a seeded synthetic slice with the trace's shape is used and said so.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp
from netkv_proxy.cli import serving
from netkv_proxy.config import ProxySettings

from netkv.core.prefix_cache import BLOCK_TOKENS
from netkv.core.topology import Topology
from netkv.prompts import tokens_for_blocks
from netkv.testbed.client import stream_request
from netkv.testbed.enginehost import engine_urls
from netkv.testbed.engines import Outcome, Request
from netkv.testbed.runner import (
    MapEndpoints,
    PolicyResult,
    ReplaySpec,
    load_requests,
    worker_entries,
)


def synthetic_requests(spec: ReplaySpec, seed: int = 7) -> list[Request]:
    """Requests shaped like the conversation trace (bursts every ~3 s, lognormal prompts
    around 7k tokens, shared prefixes), for when the trace is absent."""
    rng = random.Random(seed)
    out: list[Request] = []
    prefixes = [tuple(rng.randrange(1 << 30) for _ in range(8)) for _ in range(6)]
    for i in range(spec.count):
        tokens = max(256, min(int(rng.lognormvariate(8.8, 0.9)), 120_000))
        blocks = -(-tokens // BLOCK_TOKENS)
        shared = prefixes[rng.randrange(len(prefixes))][: blocks // 2]
        own = tuple(rng.randrange(1 << 30) for _ in range(blocks - len(shared)))
        arrival = min((i // 8) * 3.0 / spec.speedup, spec.max_span_s)
        out.append(Request(f"s{i}", arrival, tokens, rng.randrange(50, 600), shared + own))
    return out


def requests_for(trace: Path | None, spec: ReplaySpec) -> tuple[list[Request], str]:
    if trace is not None and trace.exists():
        return load_requests(trace, spec), str(trace)
    return synthetic_requests(spec), "synthetic (trace file not found)"


async def replay(topology: Topology, engine_url: str, requests: Sequence[Request],
                 policies: Sequence[str], *, endpoints: MapEndpoints | None = None,
                 bytes_per_token: float = 33.0, drain_s: float = 4.0,
                 timeout_s: float = 180.0,
                 host_urls: Mapping[str, str] | None = None) -> dict[str, PolicyResult]:
    """Replay once per policy; ``engine_url`` is a template such as ``http://{host}:9000``
    for a host's first instance (``host_urls`` maps hosts to URLs explicitly instead)."""
    hosts = {h.name: (host_urls or {}).get(h.name) or engine_url.format(host=h.name)
             for h in topology.hosts}
    entries = worker_entries(topology, engine_urls(topology, hosts))
    prompts = [tokens_for_blocks(r.block_hashes, r.prompt_tokens, BLOCK_TOKENS)
               for r in requests]
    endpoints = endpoints or MapEndpoints()
    results: dict[str, PolicyResult] = {}
    for policy in policies:
        settings = ProxySettings(
            port=0, prefill=entries["prefill"], decode=entries["decode"], policy=policy,
            redis=endpoints.redis, mqtt=endpoints.mqtt, kv_bytes_per_token=bytes_per_token,
            block_size=BLOCK_TOKENS, prefill_timeout_s=timeout_s, map_poll_s=0.5)
        async with serving(settings, topology) as (_, url), aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
            t0 = time.monotonic()

            async def one(req: Request, prompt: list[int], policy: str = policy,
                          t0: float = t0) -> Outcome:
                await asyncio.sleep(max(t0 + req.arrival_s - time.monotonic(), 0.0))
                return await stream_request(http, url, req, prompt=prompt, policy=policy,
                                            t0=t0)

            outcomes = await asyncio.gather(*(one(r, p) for r, p in zip(requests, prompts,
                                                                         strict=True)))
            await asyncio.sleep(drain_s)
        result = PolicyResult(policy, list(outcomes))
        for o in result.outcomes:
            if o.error is None and o.decode and o.prefill:
                src = topology.host_id(topology.instance(o.prefill).host)
                dst = topology.host_id(topology.instance(o.decode).host)
                tier = topology.tier(src, dst).name.lower()
                result.tiers[tier] = result.tiers.get(tier, 0) + 1
        results[policy] = result
    return results
