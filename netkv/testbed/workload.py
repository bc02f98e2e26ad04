"""The compose testbed's one-shot workload: replay a trace slice once per policy through the
engine hosts' ``POST /v1/generate`` and print the comparison table.

Each request goes to the prefill instance chosen round robin by request index (the same for
every policy); the engine host asks the scheduler for the decode instance and ships the KV
bytes, and answers with the request's timestamps. Without the trace file (it is not shipped
with the project) a seeded synthetic slice with the trace's shape is used and said so.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from netkv.core.topology import Topology
from netkv.testbed.engines import Outcome, Request
from netkv.testbed.runner import PolicyResult, ReplaySpec, load_requests


def synthetic_requests(spec: ReplaySpec, seed: int = 7) -> list[Request]:
    """Requests shaped like the conversation trace (bursts every ~3 s, lognormal prompts
    around 7k tokens, shared prefixes), for when the trace is absent."""
    rng = random.Random(seed)
    out: list[Request] = []
    prefixes = [tuple(rng.randrange(1 << 30) for _ in range(8)) for _ in range(6)]
    for i in range(spec.count):
        tokens = max(256, min(int(rng.lognormvariate(8.8, 0.9)), 120_000))
        blocks = (tokens + 511) // 512
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
                 policies: Sequence[str], *, drain_s: float = 4.0,
                 timeout_s: float = 180.0,
                 host_urls: Mapping[str, str] | None = None) -> dict[str, PolicyResult]:
    """Replay once per policy; ``engine_url`` is a template such as ``http://{host}:9000``
    (``host_urls`` maps hosts to URLs explicitly instead)."""
    urls = dict(host_urls or {})
    prefills = topology.instances_with_role("prefill")
    results: dict[str, PolicyResult] = {}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for policy in policies:
            start = loop.time()

            async def one(k: int, req: Request, policy: str = policy,
                          start: float = start) -> Outcome:
                await asyncio.sleep(max(start + req.arrival_s - loop.time(), 0.0))
                inst = prefills[k % len(prefills)]
                rid = f"{policy}-{req.request_id}"
                body = {"request_id": rid, "prefill": inst.name,
                        "prompt_tokens": req.prompt_tokens, "output_tokens": req.output_tokens,
                        "block_hashes": list(req.block_hashes), "policy": policy}
                try:
                    base = urls.get(inst.host) or engine_url.format(host=inst.host)
                    async with http.post(base + "/v1/generate", json=body) as resp:
                        data: dict[str, Any] = await resp.json()
                    if resp.status != 200:
                        return Outcome(rid, inst.name, policy=policy, error=str(data))
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    return Outcome(rid, inst.name, policy=policy, error=f"{exc!r}")
                fields = {k: v for k, v in data.items() if k not in ("ttft_s", "transfer_s")}
                return Outcome(**fields)

            outcomes = await asyncio.gather(*(one(k, r) for k, r in enumerate(requests)))
            result = PolicyResult(policy, list(outcomes))
            for o in result.outcomes:
                if o.error is None and o.decode:
                    src = topology.host_id(topology.instance(o.prefill).host)
                    dst = topology.host_id(topology.instance(o.decode).host)
                    tier = topology.tier(src, dst).name.lower()
                    result.tiers[tier] = result.tiers.get(tier, 0) + 1
            results[policy] = result
            await asyncio.sleep(drain_s)
    return results
