"""Engine load scraped from a Prometheus endpoint in vLLM's format.

An instance with a ``metrics_url`` is scraped every ``interval_s`` for vLLM's
``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc``;
the result refreshes its load in the :class:`~netkv.routing.instances.InstanceRegistry`.
"""

from __future__ import annotations

import asyncio
import math
import re

import aiohttp

from netkv.routing.instances import InstanceInfo, InstanceRegistry, Load

VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"
MAX_SCRAPE_BYTES = 1 << 20  # a vLLM page is ~10-200 KB


_SAMPLE = re.compile(
    rb"^(vllm:num_requests_running|vllm:num_requests_waiting|vllm:kv_cache_usage_perc)"
    rb"(?:\{[^}\n]*\})?[ \t]+([^ \t\n]+)", re.M)


def parse_vllm_metrics(text: str | bytes) -> Load:
    """Sum vLLM's load gauges over all label sets (one engine may expose several).

    A regular-expression scan for the three gauges only (C speed, nothing else of the page is
    parsed or kept); raises ValueError with a short category, never with page content.
    """
    raw = text.encode() if isinstance(text, str) else text
    totals = {VLLM_RUNNING: 0.0, VLLM_WAITING: 0.0}
    kv: list[float] = []
    seen = False
    for match in _SAMPLE.finditer(raw):
        name = match.group(1).decode()
        try:
            value = float(match.group(2))
        except ValueError:
            continue
        if not math.isfinite(value) or value < 0:
            continue
        if name in totals:
            totals[name] += value
        else:
            kv.append(value)
        seen = True
    if not seen:
        raise ValueError("no vllm load gauges")
    kv_use = min(max(kv), 1.0) if kv else 0.0
    return Load(totals[VLLM_RUNNING], totals[VLLM_WAITING], kv_use)


async def scrape_once(session: aiohttp.ClientSession, registry: InstanceRegistry,
                      timeout_s: float, max_bytes: int = MAX_SCRAPE_BYTES,
                      concurrency: int = 16) -> int:
    """Scrape every instance that has a metrics URL; returns how many succeeded.

    Each scrape is bounded in time (``timeout_s``) and size (``max_bytes``: a larger page is
    an error, not a truncated parse) and parsed off the event loop. ``scrape_error`` is a
    short category (``timeout``, ``http 404``, ``too large``...), never page content.
    """
    targets = [i for i in registry.by_name.values() if i.metrics_url]
    gate = asyncio.Semaphore(concurrency)

    async def one(info: InstanceInfo) -> bool:
        assert info.metrics_url is not None
        try:
            async with gate, asyncio.timeout(timeout_s), \
                    session.get(info.metrics_url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise _ScrapeError(f"http {resp.status}")
                if (resp.content_length or 0) > max_bytes:
                    raise _ScrapeError("too large")
                body = await resp.content.read(max_bytes + 1)
                if len(body) > max_bytes:
                    raise _ScrapeError("too large")
            load = await asyncio.to_thread(parse_vllm_metrics, body)
        except _ScrapeError as exc:
            info.scrape_error = str(exc)
            return False
        except TimeoutError:
            info.scrape_error = "timeout"
            return False
        except aiohttp.ClientError:
            info.scrape_error = "connection failed"
            return False
        except ValueError:
            info.scrape_error = "no vllm load gauges"
            return False
        info.scrape_error = None
        registry.set_load(info, load)
        return True

    results = await asyncio.gather(*(one(t) for t in targets))
    return sum(results)


class _ScrapeError(Exception):
    pass


async def scrape_forever(registry: InstanceRegistry, interval_s: float,
                         timeout_s: float, max_bytes: int = MAX_SCRAPE_BYTES) -> None:
    """Background task: refresh scraped loads every ``interval_s`` (cancellation ends it)."""
    async with aiohttp.ClientSession() as session:
        while True:
            if any(i.metrics_url for i in registry.by_name.values()):
                await scrape_once(session, registry, timeout_s, max_bytes)
            await asyncio.sleep(interval_s)
