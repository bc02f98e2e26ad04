"""Replay a trace slice once per policy, under the same background schedule, and summarise.

Requests go through ``netkv proxy`` (the OpenAI-compatible P/D proxy) in front of ``netkv
engine`` instances, as a vLLM deployment's clients would send them. Every policy sees the same
requests at the same offsets and the same hot spots, which start ``warmup_s`` before the first
request so that the agents and the oracle have seen them; the proxy picks the prefill (the
shortest queue) and, with the policy under test, the decode. Between policies the fabric
drains and the engines and the proxy are rebuilt (fresh prefix caches, bookings and prefix
index), so runs do not leak into each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import structlog
import yaml
from netkv_proxy.config import ProxySettings, WorkerEntry
from pydantic import BaseModel, SecretStr

from netkv.config import MqttSettings, RedisSettings
from netkv.core.topology import Instance, Tier, Topology
from netkv.engine.model import EngineModel
from netkv.engine.server import Engine, EngineSettings
from netkv.errors import InputError
from netkv.prompts import tokens_for_blocks
from netkv.tasks import stop_process
from netkv.testbed.background import Background, Schedule
from netkv.testbed.client import stream_request
from netkv.testbed.engines import Outcome, Request
from netkv.testbed.fabric import FabricPlan
from netkv.workload.trace import BLOCK_TOKENS, parse_line

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ReplaySpec:
    """Which slice of the trace to replay and how fast."""

    start: int = 0
    count: int = 60
    speedup: float = 4.0  # trace seconds per wall second
    max_span_s: float = 30.0  # clamp arrivals to this window (bounded runs)
    warmup_s: float = 3.0
    drain_s: float = 3.5  # >= the longest decode hold, so every release lands


def load_requests(path: Path, spec: ReplaySpec) -> list[Request]:
    """Requests ``start .. start+count`` (trace lines, blank ones skipped) of a Mooncake-format
    JSONL trace, each read strictly by the simulator's reader
    (:func:`netkv.workload.trace.parse_line`), in file order; arrivals rebased to the slice's
    first request and compressed by ``speedup``."""
    rows: list[tuple[int, int, int, tuple[int, ...]]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i < spec.start or not line.strip():
                    continue
                if len(rows) >= spec.count:
                    break
                rows.append(parse_line(line, f"{path}:{i + 1}"))
    except OSError as exc:
        raise InputError(str(path), f"cannot read trace: {exc.strerror}") from None
    if not rows:
        raise InputError(str(path), f"no requests at offset {spec.start}")
    t0 = rows[0][0]
    return [Request(f"r{spec.start + k}", min((ts / 1000.0 - t0 / 1000.0) / spec.speedup,
                                              spec.max_span_s), tokens, output, hashes)
            for k, (ts, tokens, output, hashes) in enumerate(rows)]


@dataclass
class PolicyResult:
    policy: str
    outcomes: list[Outcome] = field(default_factory=list)
    hot_crossings: int = 0
    tiers: dict[str, int] = field(default_factory=dict)
    proxy_ttft_mean_s: float = float("nan")  # the proxy's own histogram (end to end there)

    def summary(self) -> dict[str, Any]:
        ok = [o for o in self.outcomes if o.error is None]
        ttft = np.array([o.ttft_s for o in ok]) if ok else np.zeros(0)
        xfer = np.array([o.transfer_s for o in ok]) if ok else np.zeros(0)

        def stat(a: np.ndarray[Any, Any], fn: Callable[[Any], Any]) -> float:
            return float(fn(a)) if a.size else float("nan")

        return {
            "requests": len(self.outcomes),
            "completed": len(ok),
            "errors": len(self.outcomes) - len(ok),
            "ttft_mean_s": stat(ttft, np.mean),
            "ttft_p50_s": stat(ttft, lambda a: np.percentile(a, 50)),
            "ttft_p99_s": stat(ttft, lambda a: np.percentile(a, 99)),
            "transfer_mean_s": stat(xfer, np.mean),
            "transfer_p99_s": stat(xfer, lambda a: np.percentile(a, 99)),
            "kv_bytes_mean": stat(np.array([o.kv_bytes for o in ok]), np.mean),
            "hot_link_transfers": self.hot_crossings,
            "tiers": self.tiers,
            "proxy_ttft_mean_s": self.proxy_ttft_mean_s,
        }


# Engines, proxy and client share one process here: tokens are streamed 16 per write after
# the first (vLLM's --stream-interval), which leaves TTFT and the decode's occupancy alone.
STREAM_INTERVAL = 16


@dataclass(frozen=True, slots=True)
class MapEndpoints:
    """Where the proxy reads the congestion map (the control plane's Redis and broker)."""

    redis: RedisSettings | None = None
    mqtt: MqttSettings | None = None

    @classmethod
    def from_config(cls, shared: dict[str, Any]) -> MapEndpoints:
        mqtt = shared.get("mqtt") or {}
        return cls(RedisSettings(url=str(shared["redis"]["url"])) if shared.get("redis")
                   else None,
                   MqttSettings(host=str(mqtt["host"]), port=int(mqtt["port"])) if mqtt
                   else None)


class ProxyReplay:
    """One fabric's replays through ``netkv proxy`` in front of ``netkv engine`` instances.

    Every instance of the topology is an :class:`~netkv.engine.server.Engine` whose HTTP
    port is on the replay's loopback and whose KV side channel (prefill) and pulls (decode)
    live in its host's namespace, so the KV bytes cross the shaped links. The proxy runs in
    this process with the control plane's map feed. Engines and proxy are fresh for every
    policy (no prefix cache, booking or prefix index carries over). The client streams every
    request (``POST /v1/completions``, the prompt as token ids built from the trace's block
    ids) and takes TTFT at the first chunk the proxy passes on.
    """

    def __init__(self, plan: FabricPlan, model: EngineModel, schedule: Schedule,
                 spec: ReplaySpec, endpoints: MapEndpoints, *,
                 request_timeout_s: float = 180.0) -> None:
        self.plan, self.model, self.schedule, self.spec = plan, model, schedule, spec
        self.endpoints = endpoints
        self.request_timeout_s = request_timeout_s
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        t = plan.topology
        if not t.instances_with_role("decode") or not t.instances_with_role("prefill"):
            raise InputError("topology", "the testbed needs prefill and decode instances")

    def clock(self) -> float:
        return self._loop.time() - self._t0

    def _engine_settings(self, inst: Instance) -> EngineSettings:
        return EngineSettings(
            role=inst.role, host="127.0.0.1", port=0,
            side_channel_host=self.plan.host_addr[inst.host], side_channel_port=0,
            engine_id=inst.name, block_size=BLOCK_TOKENS, ns=self.plan.host_ns[inst.host],
            record_requests=0, model=self.model, stream_interval=STREAM_INTERVAL,
            max_model_len=1 << 21)  # trace prompts reach ~130k tokens

    def _proxy_settings(self, policy: str, engines: dict[str, Engine]) -> ProxySettings:
        entries = worker_entries(self.plan.topology, {n: e.url for n, e in engines.items()})
        return ProxySettings(
            port=0, prefill=entries["prefill"], decode=entries["decode"], policy=policy,
            redis=self.endpoints.redis, mqtt=self.endpoints.mqtt,
            kv_bytes_per_token=self.model.bytes_per_token,
            capacity_tokens=self.model.capacity_tokens, block_size=BLOCK_TOKENS,
            # engines, proxy and client share one event loop on a loaded machine: generous
            # health timeouts, so a slow loop is not taken for a dead engine
            prefill_timeout_s=self.request_timeout_s, health_interval_s=1.0,
            health_timeout_s=5.0, eject_after=3,
            map_poll_s=0.5, oracle_cache_s=0.1, log_level="warning")

    async def replay(self, policy: str, requests: Sequence[Request]) -> PolicyResult:
        """Every request once under ``policy``; background flows run from ``warmup_s``
        before the first arrival until the schedule ends."""
        result = PolicyResult(policy)
        prompts = [tokens_for_blocks(r.block_hashes, r.prompt_tokens, BLOCK_TOKENS)
                   for r in requests]
        async with contextlib.AsyncExitStack() as stack:
            engines: dict[str, Engine] = {}
            for inst in self.plan.topology.instances:
                engines[inst.name] = await stack.enter_async_context(
                    Engine(self._engine_settings(inst)))
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="netkv-replay-")))
            url = await stack.enter_async_context(proxy_process(
                self._proxy_settings(policy, engines),
                self.plan.write_topology(workdir / "topology.yaml"), workdir))
            http = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s)))
            async with Background(self.plan, self.schedule, self.clock) as background:
                background.start()
                await asyncio.sleep(self.spec.warmup_s)
                start = self.clock()
                result.outcomes = list(await asyncio.gather(*(
                    self._at(http, url, start + r.arrival_s, r, prompt=p, policy=policy)
                    for r, p in zip(requests, prompts, strict=True))))
                await background.stop()
            await asyncio.sleep(self.spec.drain_s)
            result.proxy_ttft_mean_s = await _proxy_ttft_mean(http, url)
        self._classify(result, start - self.spec.warmup_s)
        return result

    async def _at(self, http: aiohttp.ClientSession, url: str, when: float, req: Request,
                  *, prompt: list[int], policy: str) -> Outcome:
        await asyncio.sleep(max(when - self.clock(), 0.0))
        return await stream_request(http, url, req, prompt=prompt, policy=policy,
                                    t0=self._t0, first_token="chunk")

    def _classify(self, result: PolicyResult, schedule_t0: float) -> None:
        t = self.plan.topology
        for o in result.outcomes:
            if o.error is not None or not o.decode or not o.prefill:
                continue
            src = t.instance(o.prefill).host
            dst = t.instance(o.decode).host
            tier = Tier(t.tier(t.host_id(src), t.host_id(dst))).name.lower()
            result.tiers[tier] = result.tiers.get(tier, 0) + 1
            hot = self.schedule.links(o.transfer_start_s - schedule_t0)
            if any(self.plan.crosses(src, dst, link) for link in hot):
                result.hot_crossings += 1


def worker_entries(topology: Topology, urls: Mapping[str, str]
                   ) -> dict[str, tuple[WorkerEntry, ...]]:
    """Proxy workers for every instance of ``topology`` (``urls``: instance -> base URL),
    named by instance so the proxy's answers say which instance served."""
    return {role: tuple(WorkerEntry(url=urls[i.name], host=i.name)
                        for i in topology.instances_with_role(role))
            for role in ("prefill", "decode")}


def _plain(value: Any) -> Any:
    """Settings as YAML-ready builtins (tuples become lists, unset values vanish, secrets are
    written out: the file is the proxy's own config)."""
    if isinstance(value, BaseModel):
        return {k: _plain(v) for k, v in value.model_dump(exclude_none=True).items()}
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@contextlib.asynccontextmanager
async def proxy_process(settings: ProxySettings, topology: Path, workdir: Path,
                        timeout_s: float = 60.0) -> AsyncIterator[str]:
    """``netkv proxy`` as its own process (in this thread's network namespace, which a child
    inherits), configured from ``settings``; yields its URL once it serves."""
    config = workdir / "proxy.yaml"
    plain = _plain(settings) | {"topology": str(topology)}
    config.write_text(yaml.safe_dump({"proxy": plain}, sort_keys=False))
    log_path = workdir / "proxy.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "netkv.cli", "proxy", "--config", str(config),
            stdout=log_file, stderr=asyncio.subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        url = ""
        while not url:
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"netkv proxy did not start; see {log_path}: "
                                   f"{log_path.read_text()[-2000:]}")
            found = re.search(r"proxy ready: (\S+)", log_path.read_text())
            url = found.group(1) if found else ""
            if not url:
                await asyncio.sleep(0.1)
        yield url
    finally:
        await stop_process(proc, 5.0)


async def _proxy_ttft_mean(http: aiohttp.ClientSession, url: str) -> float:
    """The proxy's own end-to-end TTFT histogram, sum / count (NaN when unreadable)."""
    try:
        async with http.get(url + "/metrics") as resp:
            text = await resp.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return float("nan")
    values = dict(re.findall(r"^netkv_proxy_ttft_seconds_(sum|count) (\S+)$", text, re.M))
    count = float(values.get("count", 0.0))
    return float(values["sum"]) / count if count else float("nan")


async def run_policies(plan: FabricPlan, model: EngineModel, *, schedule: Schedule,
                       spec: ReplaySpec, requests: Sequence[Request], policies: Sequence[str],
                       endpoints: MapEndpoints) -> dict[str, PolicyResult]:
    """Replay ``requests`` once per policy through the proxy."""
    results: dict[str, PolicyResult] = {}
    replayer = ProxyReplay(plan, model, schedule, spec, endpoints)
    for policy in policies:
        log.info("testbed.replay", policy=policy, requests=len(requests))
        results[policy] = await replayer.replay(policy, requests)
    return results


def format_table(results: dict[str, PolicyResult]) -> str:
    head = (f"{'policy':<14}{'done':>6}{'err':>5}{'TTFT mean':>11}{'TTFT p99':>10}"
            f"{'KV xfer mean':>14}{'KV xfer p99':>13}{'hot-link':>10}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        s = r.summary()
        lines.append(f"{name:<14}{s['completed']:>6}{s['errors']:>5}"
                     f"{s['ttft_mean_s'] * 1e3:>9.0f}ms{s['ttft_p99_s'] * 1e3:>8.0f}ms"
                     f"{s['transfer_mean_s'] * 1e3:>12.0f}ms{s['transfer_p99_s'] * 1e3:>11.0f}ms"
                     f"{s['hot_link_transfers']:>10}")
    return "\n".join(lines)


def write_summary(out: Path, results: dict[str, PolicyResult], meta: dict[str, Any]) -> Path:
    """``out/summary.json`` shaped like the simulator's, plus ``out/requests.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"policies": {n: r.summary() for n, r in results.items()}, "testbed": meta}
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, allow_nan=True))
    with (out / "requests.jsonl").open("w") as f:
        for r in results.values():
            for o in r.outcomes:
                f.write(json.dumps(o.as_dict()) + "\n")
    return path
