"""The proxy's prefill and decode workers: health, ejection, re-admission and load.

Every ``health_interval_s`` each worker's ``GET /health`` and ``GET /metrics`` are read (one
supervised loop). ``eject_after`` failed checks in a row eject a worker (no new requests);
``readmit_after`` good checks in a row bring it back. A request that cannot even connect to a
worker ejects it at once (a passive check), so the next request does not try it again. When
every worker of a role is ejected, requests go to all of them rather than to none.

Load is vLLM's own gauges (``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc``) from the scrape, plus the proxy's own count of requests in
flight to the worker: requests it sent after the last scrape count as waiting, as a router
counts what it has just sent.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
import structlog

from netkv.core.topology import Topology
from netkv.routing import scrape
from netkv.routing.scrape import MAX_SCRAPE_BYTES, parse_vllm_metrics
from netkv_proxy.config import WorkerEntry

log = structlog.get_logger(__name__)

Role = Literal["prefill", "decode"]


@dataclass(slots=True)
class Worker:
    name: str
    role: Role
    base: str  # http://host:port (no /v1)
    host: str  # topology host
    host_index: int
    index: int  # within its role
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    healthy: bool = True
    fails: int = 0
    oks: int = 0
    ejections: int = 0
    last_error: str | None = None
    running: float = 0.0
    waiting: float = 0.0
    kv_use: float = 0.0
    scraped: bool = False
    inflight: int = 0
    inflight_at_scrape: int = 0  # the proxy's own in-flight count when the gauges were read
    prefill_work: float = 0.0  # uncached prompt tokens in flight here (prefill workers)
    prefill_ewma_s: float = 0.0  # measured prefill time (prefill workers)
    models: list[str] = field(default_factory=list)

    @property
    def queue(self) -> float:
        """Requests ahead of a new one: the scrape's, or the proxy's own count if larger."""
        return max(self.running + self.waiting, float(self.inflight))

    def observe_prefill(self, seconds: float, alpha: float = 0.2) -> None:
        self.prefill_ewma_s = seconds if self.prefill_ewma_s == 0 else \
            (1 - alpha) * self.prefill_ewma_s + alpha * seconds


_GAUGES = tuple(b"\n" + n.encode() for n in (scrape.VLLM_RUNNING, scrape.VLLM_WAITING,
                                                scrape.VLLM_KV_USAGE))


def gauge_lines(page: bytes) -> bytes:
    """The lines of a metrics page that start with one of the three load gauges' names, in
    page order. :func:`parse_vllm_metrics` of them equals its result on the whole page (it
    reads only such lines), but a real vLLM page is 10-200 KB of other series: scanning it with
    the parser's regular expression took ~3 ms of the event loop per 180 KB page and worker
    each health round; ``bytes.find`` skips the rest at memory speed."""
    text = b"\n" + page  # every line, the first too, starts after a newline
    found: list[tuple[int, int]] = []
    for key in _GAUGES:
        at = text.find(key)
        while at >= 0:
            end = text.find(b"\n", at + 1)
            end = len(text) if end < 0 else end
            found.append((at + 1, end))
            at = text.find(key, end)
    found.sort()
    return b"\n".join(text[a:b] for a, b in found)


def _unique(workers: list[Worker]) -> list[Worker]:
    """Worker names unique within a role (``host#k`` for the k-th on one host)."""
    seen: dict[str, int] = {}
    for w in workers:
        seen[w.name] = seen.get(w.name, 0) + 1
    count: dict[str, int] = {}
    for w in workers:
        if seen[w.name] > 1:
            k = count[w.name] = count.get(w.name, -1) + 1
            w.name = f"{w.name}#{k}"
    return workers


def topology_host(topology: Topology, name: str) -> str:
    """A worker's host: a topology host name, or an instance name standing for its host."""
    if name in {h.name for h in topology.hosts}:
        return name
    try:
        return topology.instance(name).host
    except (KeyError, ValueError):
        return name


class WorkerPool:
    """All workers, by role, and the health loop that keeps their state."""

    def __init__(self, prefill: tuple[WorkerEntry, ...], decode: tuple[WorkerEntry, ...],
                 topology: Topology, *, eject_after: int, readmit_after: int) -> None:
        self.eject_after, self.readmit_after = eject_after, readmit_after
        self.prefills = _unique([self._make(e, "prefill", i, topology)
                                 for i, e in enumerate(prefill)])
        self.decodes = _unique([self._make(e, "decode", i, topology)
                                for i, e in enumerate(decode)])
        self._rr = itertools.count()

    @staticmethod
    def _make(entry: WorkerEntry, role: Role, index: int, topology: Topology) -> Worker:
        host = topology_host(topology, entry.host_name)
        return Worker(name=entry.host or urlsplit(entry.url).netloc, role=role, base=entry.base,
                      host=host, host_index=topology.host_id(host), index=index,
                      bootstrap_host=entry.bootstrap_host or urlsplit(entry.url).hostname,
                      bootstrap_port=entry.bootstrap_port)

    @property
    def all(self) -> list[Worker]:
        return [*self.prefills, *self.decodes]

    def healthy(self, role: Role) -> list[Worker]:
        """The admitted workers of ``role``; all of them when every one is ejected (a
        "panic" fallback, as Envoy's: trying a worker that failed its checks beats refusing
        every request, and a request that cannot connect still ejects at once)."""
        pool = self.prefills if role == "prefill" else self.decodes
        return [w for w in pool if w.healthy] or list(pool)

    def pick_prefill(self, exclude: set[int]) -> Worker | None:
        """The healthy prefill with the shortest queue (ties in turn), not in ``exclude``."""
        options = [w for w in self.healthy("prefill") if w.index not in exclude]
        if not options:
            return None
        best = min(w.queue for w in options)
        ties = [w for w in options if w.queue == best]
        return ties[next(self._rr) % len(ties)]

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for w in self.all:
            for m in w.models:
                seen.setdefault(m, None)
        return list(seen)

    # -- health ---------------------------------------------------------------------------
    def failed(self, worker: Worker, reason: str, *, at_once: bool = False) -> None:
        worker.oks = 0
        worker.fails = self.eject_after if at_once else worker.fails + 1
        worker.last_error = reason
        if worker.healthy and worker.fails >= self.eject_after:
            worker.healthy = False
            worker.ejections += 1
            log.warning("worker ejected", worker=worker.name, role=worker.role, reason=reason)

    def succeeded(self, worker: Worker) -> None:
        worker.fails = 0
        worker.oks += 1
        if not worker.healthy and worker.oks >= self.readmit_after:
            worker.healthy = True
            worker.last_error = None
            log.info("worker re-admitted", worker=worker.name, role=worker.role)

    async def check(self, session: aiohttp.ClientSession, worker: Worker,
                    timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                async with session.get(worker.base + "/health") as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise ValueError(f"/health: HTTP {resp.status}")
                async with session.get(worker.base + "/metrics") as resp:
                    if resp.status == 200:
                        at = worker.inflight
                        page = await resp.content.read(MAX_SCRAPE_BYTES)
                        try:
                            load = parse_vllm_metrics(gauge_lines(page))
                        except ValueError:
                            pass  # an engine without vLLM's gauges: proxy counts only
                        else:
                            worker.running, worker.waiting = load.running, load.waiting
                            worker.kv_use, worker.scraped = load.kv_use, True
                            worker.inflight_at_scrape = min(at, worker.inflight)
                    else:
                        await resp.read()
                if not worker.models:
                    async with session.get(worker.base + "/v1/models") as resp:
                        if resp.status == 200:
                            data = await resp.json(content_type=None)
                            worker.models = [str(m["id"]) for m in data.get("data", [])
                                             if isinstance(m, dict) and "id" in m][:16]
                        else:
                            await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError,
                AttributeError) as exc:
            self.failed(worker, f"{type(exc).__name__}: {exc}"[:200])
            return
        self.succeeded(worker)

    async def check_all(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        await asyncio.gather(*(self.check(session, w, timeout_s) for w in self.all))

    async def run(self, session: aiohttp.ClientSession, interval_s: float,
                  timeout_s: float) -> None:
        """The health loop (a supervised daemon task)."""
        while True:
            await self.check_all(session, timeout_s)
            await asyncio.sleep(interval_s)
