"""Engine load scraped from a Prometheus endpoint in vLLM's format.

An instance with a ``metrics_url`` is scraped every ``interval_s`` for vLLM's
``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc``;
the result refreshes its load in the :class:`~netkv.routing.instances.InstanceRegistry`.
"""

from __future__ import annotations

import asyncio
import math

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from netkv.routing.instances import InstanceInfo, InstanceRegistry, Load

VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"
MAX_SCRAPE_BYTES = 4 << 20


def parse_vllm_metrics(text: str) -> Load:
    """Sum vLLM's load gauges over all label sets (one engine may expose several)."""
    totals = {VLLM_RUNNING: 0.0, VLLM_WAITING: 0.0}
    kv: list[float] = []
    seen = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not math.isfinite(sample.value) or sample.value < 0:
                continue
            if sample.name in totals:
                totals[sample.name] += sample.value
                seen = True
            elif sample.name == VLLM_KV_USAGE:
                kv.append(sample.value)
                seen = True
    if not seen:
        raise ValueError("no vllm load gauges in the scrape")
    kv_use = min(max(kv), 1.0) if kv else 0.0
    return Load(totals[VLLM_RUNNING], totals[VLLM_WAITING], kv_use)


async def scrape_once(session: aiohttp.ClientSession, registry: InstanceRegistry,
                      timeout_s: float) -> int:
    """Scrape every instance that has a metrics URL; returns how many succeeded."""
    targets = [i for i in registry.by_name.values() if i.metrics_url]

    async def one(info: InstanceInfo) -> bool:
        assert info.metrics_url is not None
        try:
            async with asyncio.timeout(timeout_s), session.get(info.metrics_url) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.content.read(MAX_SCRAPE_BYTES)
            load = parse_vllm_metrics(body.decode("utf-8", errors="replace"))
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeError) as exc:
            info.scrape_error = str(exc) or type(exc).__name__
            return False
        info.scrape_error = None
        registry.set_load(info, load)
        return True

    results = await asyncio.gather(*(one(t) for t in targets))
    return sum(results)


async def scrape_forever(registry: InstanceRegistry, interval_s: float,
                         timeout_s: float) -> None:
    """Background task: refresh scraped loads every ``interval_s`` (cancellation ends it)."""
    async with aiohttp.ClientSession() as session:
        while True:
            if any(i.metrics_url for i in registry.by_name.values()):
                await scrape_once(session, registry, timeout_s)
            await asyncio.sleep(interval_s)
