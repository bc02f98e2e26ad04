"""The same replay through each router in turn: NetKV's proxy beside the real peers.

For every router of ``--routers`` (see :mod:`netkv.testbed.routers`) the comparison builds
fresh ``netkv engine`` instances (HTTP on the control namespace's loopback, KV side channels
and pulls in the host namespaces, so the KV bytes cross the shaped links), starts the router
as a separate, pinned process in the control namespace, runs the same fault and hot-spot
schedule (:mod:`netkv.testbed.faults`, :mod:`netkv.testbed.background`) at the same offsets,
replays the same requests at the same times, and stops everything before the next router.
NetKV's proxy runs as a process too (``netkv proxy``), with the same CPU share as the peers,
following the control plane's congestion map; the peers see only what they see in a real
deployment (their own health checks and, for ``power_of_two``, their in-flight counts).

Measured at the client: TTFT (request sent -> first streamed chunk) and errors. Measured at
the engines: each request's KV transfer (the decode engine times its pull and says so in
``x-netkv-kv-*`` response headers, which every router here passes on) and, as a cross-check,
the decode engines' ``netkv_engine_kv_transfer_seconds`` histograms. Which prefill and decode
served a request comes from the proxy's ``x-netkv-prefill``/``x-netkv-decode`` headers, from
vllm-router's request id (``___prefill_addr_<a>___decode_addr_<b>_<uuid>``, the id of every
streamed chunk), or from the engines' ``x-netkv-engine``/``x-netkv-kv-from`` headers where
they send them; a request whose pair is unknown is counted as unclassified, never guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import structlog
import yaml

from netkv.core.topology import Tier
from netkv.testbed.background import Background
from netkv.testbed.client import stream_request
from netkv.testbed.engines import EngineModel, Outcome, Request
from netkv.testbed.fabric import FabricPlan
from netkv.testbed.faults import Faults, FaultSchedule
from netkv.testbed.routerrun import RouterRun, decided_at, reaction
from netkv.testbed.routers import (
    Pinning,
    RouterError,
    RouterProcess,
    RouterSpec,
    Spawn,
    Worker,
    router_command,
)
from netkv.testbed.runner import STREAM_INTERVAL, PolicyResult, ReplaySpec
from netkv.workload.trace import BLOCK_TOKENS

log = structlog.get_logger(__name__)


class EngineApi:
    """The vLLM-protocol engines of issue 12 (``netkv.engine``, ``netkv.prompts``), looked
    up when a comparison starts, so that this module imports (and its pure parts are
    tested) where they are not installed yet."""

    def __init__(self) -> None:
        try:
            server = importlib.import_module("netkv.engine.server")
            prompts = importlib.import_module("netkv.prompts")
        except ImportError as exc:
            raise RouterError("the router comparison needs the vLLM-protocol engines "
                              f"(netkv.engine, `netkv engine`): {exc}") from None
        self.Engine: Any = server.Engine
        self.EngineSettings: Any = server.EngineSettings
        self.tokens_for_blocks: Any = prompts.tokens_for_blocks

ROUTER_HOST = "127.0.0.1"  # the control namespace's loopback, where the engines' HTTP is
ROUTER_PORT = 18000
METRICS_PORT = 19000
TIMELINE_REQUESTS = 100_000  # the engines keep every replayed request's phase timestamps
CPU_SAMPLE_S = 0.1  # how often the router's and the replay's CPU time are sampled
MAP_SAMPLE_S = 0.25  # how often the oracle's estimates to every decode host are read


class RouterComparison:
    """Replays through each router on one built fabric with a running control plane."""

    def __init__(self, plan: FabricPlan, model: EngineModel, schedule: FaultSchedule,
                 spec: ReplaySpec, *, spawn: Spawn, workdir: Path, shared_config: dict[str, Any],
                 pinning: Pinning | None = None, request_timeout_s: float = 120.0,
                 oracle_url: str | None = None) -> None:
        schedule.check(plan)
        self.plan, self.model, self.schedule, self.spec = plan, model, schedule, spec
        self.spawn, self.workdir = spawn, workdir
        self.shared_config = shared_config
        self.pinning = pinning or Pinning()
        self.request_timeout_s = request_timeout_s
        self.oracle_url = oracle_url
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._runs = 0
        self.api = EngineApi()

    def clock(self) -> float:
        return self._loop.time() - self._t0

    # -- engines and routers ----------------------------------------------------------------
    def _engine_settings(self, name: str) -> Any:
        inst = self.plan.topology.instance(name)
        return self.api.EngineSettings(
            role=inst.role, host=ROUTER_HOST, port=0,
            side_channel_host=self.plan.host_addr[inst.host], side_channel_port=0,
            engine_id=inst.name, block_size=BLOCK_TOKENS,
            ns=self.plan.host_ns[inst.host], record_requests=0, model=self.model,
            # 16 tokens per streamed write after the first, as the policy replay does: the
            # modelled 2 ms per token is ~15x a 70B decode's, so one write per token would
            # stream ~15x a deployment's chunk rate through every router and the client
            # (the first token still goes out at once; TTFT and occupancy are unchanged)
            timeline=TIMELINE_REQUESTS, stream_interval=STREAM_INTERVAL)

    def proxy_config(self) -> Path:
        """``netkv proxy``'s config: the control plane's map and the testbed's KV model.
        Health checks and load scrapes at the proxy's own default cadence (1 s; the peers
        check every 60 s and never scrape); the map is re-read on every announcement, with a
        0.5 s poll as the fallback."""
        path = self.workdir / "proxy.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.shared_config | {"proxy": {
            "kv_bytes_per_token": self.model.bytes_per_token,
            "capacity_tokens": self.model.capacity_tokens, "block_size": BLOCK_TOKENS,
            "prefill_timeout_s": self.request_timeout_s,
            "map_poll_s": 0.5, "oracle_cache_s": 0.1}}, sort_keys=False))
        return path

    def _router(self, spec: RouterSpec, engines: dict[str, Any]) -> RouterProcess:
        t = self.plan.topology
        prefill = [Worker(engines[i.name].url, i.name, engines[i.name].side_channel_port)
                   for i in t.instances_with_role("prefill")]
        decode = [Worker(engines[i.name].url, i.name) for i in t.instances_with_role("decode")]
        k = self._runs
        self._runs += 1
        command = router_command(spec, prefill, decode, host=ROUTER_HOST,
                                 port=ROUTER_PORT + k, metrics_port=METRICS_PORT + k,
                                 netkv_args=["--config", str(self.proxy_config())])
        log_path = self.workdir / "logs" / f"router-{k}-{spec.kind}-{spec.policy}.log"
        profile = os.environ.get("TESTBED_ROUTER_PROFILE")
        wrap = os.environ.get("TESTBED_ROUTER_WRAP")
        if spec.kind == "netkv" and command.argv[1:3] == ["-m", "netkv.cli"]:
            # diagnosis only: cProfile the proxy (written when it stops; it slows the proxy),
            # or run it through a script that takes netkv's arguments (e.g. to time its steps)
            if profile:
                out = Path(profile) / f"router-{k}-{spec.policy}.prof"
                command = replace(command, argv=[command.argv[0], "-m", "cProfile", "-o",
                                                 str(out), *command.argv[1:]])
            elif wrap:
                command = replace(command, argv=[command.argv[0], wrap, *command.argv[3:]])
        return RouterProcess(spec, command, self.spawn, log_path, pinning=self.pinning)

    # -- one replay ---------------------------------------------------------------------------
    async def run(self, spec: RouterSpec, requests: Sequence[Request]) -> RouterRun:
        prompts = [self.api.tokens_for_blocks(r.block_hashes, r.prompt_tokens, BLOCK_TOKENS)
                   for r in requests]
        result = PolicyResult(spec.label)
        run = RouterRun(spec, result)
        async with contextlib.AsyncExitStack() as stack:
            engines: dict[str, Any] = {}
            for inst in self.plan.topology.instances:
                engines[inst.name] = await stack.enter_async_context(
                    self.api.Engine(self._engine_settings(inst.name)))
            names = _names_by_address(engines)
            router = await stack.enter_async_context(self._router(spec, engines))
            run.ready_after_s = router.ready_after_s
            cpu0 = router.cpu_seconds()
            http = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s)))
            background = await stack.enter_async_context(
                Background(self.plan, self.schedule.background, self.clock))
            faults = await stack.enter_async_context(
                Faults(self.plan, self.schedule, self.clock))
            background.start()
            faults.start()
            schedule_t0 = run.schedule_t0_s = self.clock()
            sampler = asyncio.ensure_future(self._sample_cpu(router, run.cpu_series))
            watcher = asyncio.ensure_future(self._watch_map(http, requests, run.map_series))
            try:
                await asyncio.sleep(self.spec.warmup_s)
                start = self.clock()
                result.outcomes = list(await asyncio.gather(*(
                    self._at(http, router.url, start + r.arrival_s, r, prompt=p,
                             label=spec.label, names=names)
                    for r, p in zip(requests, prompts, strict=True))))
            finally:
                sampler.cancel()
                watcher.cancel()
                await asyncio.gather(sampler, watcher, return_exceptions=True)
            _attach_phases(result.outcomes, engines.values(), self._t0)
            await faults.stop()
            await background.stop()
            run.fault_events = list(faults.events)
            run.router_cpu_s = router.cpu_seconds() - cpu0
            run.engine_kv_mean_s = _engine_kv_mean(engines.values())
        await asyncio.sleep(self.spec.drain_s)
        self._classify(run, schedule_t0)
        return run

    async def _sample_cpu(self, router: RouterProcess,
                          series: list[tuple[float, float, float]]) -> None:
        """The router's and this process's CPU seconds, every ``CPU_SAMPLE_S`` (where the
        time goes: a router that is CPU-bound shows a slope of 1 s/s)."""
        me = psutil.Process()
        while True:
            own = sum(me.cpu_times()[:2])
            series.append((round(self.clock(), 3), round(router.cpu_seconds(), 4),
                           round(own, 4)))
            await asyncio.sleep(CPU_SAMPLE_S)

    async def _watch_map(self, http: aiohttp.ClientSession, requests: Sequence[Request],
                         series: list[tuple[float, int, dict[str, float]]]) -> None:
        """The oracle's estimate, every ``MAP_SAMPLE_S``, of a mean-sized KV transfer from
        the first prefill host to every decode host: when a fault shows in the map (a
        diagnosis of the decisions, not an input to any router)."""
        if self.oracle_url is None or not requests:
            return
        t = self.plan.topology
        src = t.instances_with_role("prefill")[0].host
        dsts = sorted({i.host for i in t.instances_with_role("decode")})
        mean_tokens = sum(r.prompt_tokens for r in requests) / len(requests)
        body = {"src": src, "dsts": dsts, "bytes": int(self.model.kv_bytes(int(mean_tokens)))}
        while True:
            try:
                async with http.post(self.oracle_url + "/v1/costs", json=body,
                                     timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                    if resp.status == 200:
                        data = await resp.json()
                        series.append((round(self.clock(), 3), int(data["map_version"]),
                                       {c["dst"]: round(float(c["seconds"]), 4)
                                        for c in data["costs"]}))
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as exc:
                log.debug("compare.map_watch_failed", error=repr(exc))
            await asyncio.sleep(MAP_SAMPLE_S)

    async def _at(self, http: aiohttp.ClientSession, url: str, when: float, req: Request, *,
                  prompt: list[int], label: str, names: dict[str, str]) -> Outcome:
        await asyncio.sleep(max(when - self.clock(), 0.0))
        return await stream_request(http, url, req, prompt=prompt, policy=label,
                                    t0=self._t0, clock=self._loop.time,
                                    first_token="line", names=names)

    def _classify(self, run: RouterRun, schedule_t0: float) -> None:
        t = self.plan.topology
        result = run.result
        for o in result.outcomes:
            if o.error is not None:
                continue
            if not (o.prefill and o.decode):
                run.unclassified += 1
                continue
            src, dst = t.instance(o.prefill).host, t.instance(o.decode).host
            tier = Tier(t.tier(t.host_id(src), t.host_id(dst))).name.lower()
            result.tiers[tier] = result.tiers.get(tier, 0) + 1
            if not o.kv_bytes:  # no KV arrived: the engine recomputed the prompt instead
                run.recomputed += 1
            at = decided_at(o) - schedule_t0
            if any(self.plan.crosses(src, dst, link)
                   for link in self.schedule.hot_links(at)):
                result.hot_crossings += 1
            if any(self.plan.crosses(src, dst, link)
                   for link in self.schedule.faulty_links(at)):
                run.faulty_crossings += 1
        run.reaction = reaction(run, self.plan, self.schedule, schedule_t0)


def _attach_phases(outcomes: Sequence[Outcome], engines: Any, t0: float) -> None:
    """Each outcome's engine-side timestamps (``<role>.<phase>``, on the replay clock), found
    by the request id the engines saw (the streamed chunks' id, for every router here)."""
    by_id = {o.upstream_id: o for o in outcomes if o.upstream_id}
    for engine in engines:
        role = engine.settings.role
        for rid, marks in engine.timeline.items():
            o = by_id.get(rid)
            if o is not None:
                o.phases.update({f"{role}.{k}": round(v - t0, 6) for k, v in marks.items()})


def _names_by_address(engines: dict[str, Any]) -> dict[str, str]:
    """``host:port`` of every engine's HTTP URL -> its instance name."""
    return {e.url.removeprefix("http://").rstrip("/"): name for name, e in engines.items()}


def _engine_kv_mean(engines: Any) -> float:
    total = count = 0.0
    for engine in engines:
        for metric in engine.metrics.kv_transfer_s.collect():
            for sample in metric.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
    return total / count if count else float("nan")
