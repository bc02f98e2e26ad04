"""`netkv up --demo`: the same workload through the scheduler twice, under a hot link.

Each policy (``cache_load``, then ``netkv``) replays the same requests over HTTP, paced at a
fixed rate (the trace's order and sizes, its arrival times compressed by ``rate / 3.4``).
The demo also plays the decode engines the machine lacks: a decided request occupies its
decoder's KV memory (prompt + output tokens) for its decode time (output tokens x 30 ms, the
scheduler's default step, compressed by the same factor), then is released
(``POST /v1/release``); every 100 ms each decoder's KV use is reported to the scheduler
(``POST /v1/instances``), as an engine's metrics would be, so that load-aware policies see
load. During the middle stretch of each replay one host's NIC downlink is made hot on
the emulated fabric (:mod:`netkv.mesh.fabric`); the agents see it, the oracle maps it, and the
scheduler decides with whatever map it holds. The table compares what each policy chose: the
scheduler's own predicted KV transfer time and TTFT for its choice (one cost model for both
policies, the live map), the tiers, and how many decisions sent their KV across the hot link
while it was hot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from netkv.core.topology import Topology
from netkv.errors import InputError
from netkv.mesh.children import http_ready
from netkv.mesh.fabric import EmulatedFabric
from netkv.workload.synth import synthesise
from netkv.workload.trace import load_trace

HOT_FROM, HOT_TO = 0.25, 0.65  # the hot stretch, as fractions of each replay
TIER_NAMES = ("same host", "same leaf", "same pod", "across core")
HASH_OFFSET = 1 << 40  # per replay: each policy starts with a cold prefix index


@dataclass
class Decision:
    at_s: float
    hot: bool
    crossed: bool
    tier: int
    transfer_ms: float
    ttft_ms: float
    stale: bool


@dataclass
class PolicyRun:
    policy: str
    decisions: list[Decision] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def hot(self) -> list[Decision]:
        return [d for d in self.decisions if d.hot]


@dataclass
class DemoPlan:
    base: str
    topology: Topology
    requests: list[dict[str, Any]]
    prefills: list[str]
    rate_per_s: float
    fabric: EmulatedFabric | None
    hot_host: str | None
    token: str | None = None
    concurrency: int = 16
    capacity_tokens: float = 500_000.0  # the scheduler's default decoder KV capacity
    step_s: float = 0.03  # decode step per output token (the scheduler's default tbt)
    trace_rate_per_s: float = 3.4  # the conversation trace's arrival rate

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def _crosses(topology: Topology, prefill_host: str, decode_host: str, link: int | None) -> bool:
    if link is None:
        return False
    return link in topology.path(topology.host_id(prefill_host), topology.host_id(decode_host))


@dataclass
class EmulatedDecoders:
    """The decode engines' KV memory as the demo plays them: tokens held per decoder."""

    plan: DemoPlan
    held: dict[str, float] = field(default_factory=dict)
    running: Counter[str] = field(default_factory=Counter)

    def admit(self, decoder: str, tokens: float) -> None:
        self.held[decoder] = self.held.get(decoder, 0.0) + tokens
        self.running[decoder] += 1

    def finish(self, decoder: str, tokens: float) -> None:
        self.held[decoder] = max(self.held.get(decoder, 0.0) - tokens, 0.0)
        self.running[decoder] -= 1

    async def report(self, http: aiohttp.ClientSession, decoders: list[str]) -> None:
        """Every 100 ms, each decoder's load, as its engine's metrics would say."""
        while True:
            for name in decoders:
                body = {"name": name, "running": max(self.running[name], 0),
                        "kv_use": min(self.held.get(name, 0.0) / self.plan.capacity_tokens, 1.0),
                        "capacity_tokens": self.plan.capacity_tokens}
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.post(f"{self.plan.base}/v1/instances", json=body) as r:
                        await r.read()
            await asyncio.sleep(0.1)


async def replay(plan: DemoPlan, policy: str, run_index: int = 0) -> PolicyRun:
    """One paced replay of every request with ``policy``; the link is hot in the middle.

    Block hashes are offset by ``run_index`` so that a replay never finds the prefixes an
    earlier replay left in the scheduler's prefix index (each policy starts cold)."""
    run = PolicyRun(policy)
    topo = plan.topology
    hot_link = topo.link_index.get(f"{plan.hot_host}/nic/down") if plan.hot_host else None
    duration = len(plan.requests) / plan.rate_per_s
    compression = plan.rate_per_s / plan.trace_rate_per_s
    engines = EmulatedDecoders(plan)
    gate = asyncio.Semaphore(plan.concurrency)
    hosts = {i.name: i.host for i in topo.instances}
    start = time.monotonic()

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        request = plan.requests[i]
        body = {"request_id": f"demo-{policy}-{i}", "prefill": plan.prefills[i % len(
            plan.prefills)], "policy": policy, **request,
            "block_hashes": [h + run_index * HASH_OFFSET for h in request["block_hashes"]]}
        async with gate:
            hot = plan.fabric is not None and plan.fabric.hot_host is not None
            try:
                async with http.post(f"{plan.base}/v1/select", json=body) as resp:
                    answer = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                run.errors.append(f"{type(exc).__name__}: {exc}")
                return
        if resp.status != 200:
            run.errors.append(f"HTTP {resp.status}: {answer}")
            return
        run.decisions.append(Decision(
            time.monotonic() - start, hot,
            _crosses(topo, hosts[body["prefill"]], answer["decode_host"], hot_link),
            int(answer["tier"]), float(answer["breakdown"]["transfer_ms"]),
            float(answer["predicted_ttft_ms"]), bool(answer["map_stale"])))
        # The booking stands for the KV transfer in flight: released when it would be done;
        # from then on the engine's reported KV use carries the request until it finishes.
        transfer_s = float(answer["breakdown"]["transfer_ms"]) / 1e3 / compression
        await asyncio.sleep(transfer_s)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.post(f"{plan.base}/v1/release",
                                 json={"request_id": body["request_id"]}) as r:
                await r.read()
        tokens = float(request["prompt_tokens"] + request["output_tokens"])
        engines.admit(answer["decode"], tokens)
        await asyncio.sleep(request["output_tokens"] * plan.step_s / compression)
        engines.finish(answer["decode"], tokens)

    async def heat() -> None:
        if plan.fabric is None:
            return
        await asyncio.sleep(HOT_FROM * duration)
        plan.fabric.hot_host = plan.hot_host
        await asyncio.sleep((HOT_TO - HOT_FROM) * duration)
        plan.fabric.hot_host = None

    timeout = aiohttp.ClientTimeout(total=10)
    decoders = [i.name for i in topo.instances if i.role == "decode"]
    async with aiohttp.ClientSession(timeout=timeout, headers=plan.headers) as http:
        side = [asyncio.create_task(heat(), name=f"demo-heat-{policy}"),
                asyncio.create_task(engines.report(http, decoders), name="demo-engines")]
        try:
            pending: list[asyncio.Task[None]] = []
            for i in range(len(plan.requests)):
                delay = start + i / plan.rate_per_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(one(http, i)))
            await asyncio.gather(*pending)
            run.seconds = time.monotonic() - start
        finally:
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            if plan.fabric is not None:
                plan.fabric.hot_host = None
    return run


def _mean_p99(values: list[float]) -> str:
    if not values:
        return "-"
    arr = np.array(values)
    return f"{arr.mean():,.0f} / {np.percentile(arr, 99):,.0f}"


def table(runs: list[PolicyRun], hot_link: str | None, rate: float) -> str:
    """The side-by-side comparison the demo prints."""
    width = 17
    rows: list[tuple[str, list[str]]] = []
    rows.append(("decisions (errors)", [f"{len(r.decisions)} ({len(r.errors)})" for r in runs]))
    rows.append(("  while the link was hot", [str(len(r.hot())) for r in runs]))
    crossed = [sum(d.crossed for d in r.hot()) for r in runs]
    rows.append(("  sent across the hot link", [
        f"{c} ({100 * c / max(len(r.hot()), 1):.0f}%)" for c, r in zip(crossed, runs,
                                                                       strict=True)]))
    quiet = [[d for d in r.decisions if not d.hot] for r in runs]
    rows.append(("  same link, while quiet", [
        f"{sum(d.crossed for d in q)} ({100 * sum(d.crossed for d in q) / max(len(q), 1):.0f}%)"
        for q in quiet]))
    rows.append(("predicted KV transfer, ms", [""] * len(runs)))
    rows.append(("  mean / p99, while hot", [_mean_p99([d.transfer_ms for d in r.hot()])
                                            for r in runs]))
    rows.append(("  mean / p99, all", [_mean_p99([d.transfer_ms for d in r.decisions])
                                      for r in runs]))
    rows.append(("predicted TTFT, ms", [""] * len(runs)))
    rows.append(("  mean / p99, while hot", [_mean_p99([d.ttft_ms for d in r.hot()])
                                            for r in runs]))
    rows.append(("  mean / p99, all", [_mean_p99([d.ttft_ms for d in r.decisions])
                                      for r in runs]))
    rows.append(("tiers (host/leaf/pod/core)", [
        "/".join(str(c) for c in (Counter(d.tier for d in r.decisions).get(t, 0)
                                  for t in range(4))) for r in runs]))
    rows.append(("answers on tier priors", [str(sum(d.stale for d in r.decisions))
                                            for r in runs]))
    label = 30
    lines = [f"{'':<{label}}" + "".join(f"{r.policy:>{width}}" for r in runs)]
    for name, cells in rows:
        lines.append(f"{name:<{label}}" + "".join(f"{c:>{width}}" for c in cells))
    summary = "; ".join(
        f"{r.policy} {_share(r.hot())} of its decisions while hot ({_share(q)} while quiet)"
        for r, q in zip(runs, quiet, strict=True))
    lines.append(f"\nacross {hot_link or 'the hot link'}: {summary}")
    head = (f"=== NetKV demo: {len(runs[0].decisions) if runs else 0} requests per policy at "
            f"{rate:g}/s through the scheduler over HTTP; hot link: {hot_link or 'none'} "
            f"(emulated RDMA counters, {HOT_FROM:.0%}-{HOT_TO:.0%} of each replay) ===")
    return head + "\n" + "\n".join(lines)


def _share(decisions: list[Decision]) -> str:
    return f"{100 * sum(d.crossed for d in decisions) / max(len(decisions), 1):.0f}%"


def default_hot_host(topology: Topology) -> str:
    """The demo's hot host: the second decode host in topology order (h003 in the shipped
    demo). A choice made before any run; any decode host would do."""
    hosts = list(dict.fromkeys(i.host for i in topology.instances if i.role == "decode"))
    if not hosts:
        raise InputError("--hot-host", "the topology has no decode instances")
    return hosts[min(1, len(hosts) - 1)]


def demo_requests(trace: str | None, count: int) -> list[dict[str, Any]]:
    """The first ``count`` requests of the trace at ``trace`` (strictly parsed), or of the
    embedded seeded workload when no trace is given."""
    loaded = load_trace(trace, limit=count) if trace else synthesise(count)
    return [{"prompt_tokens": int(n_in), "block_hashes": list(ids), "output_tokens": int(n_out)}
            for n_in, n_out, ids in zip(loaded.input_tokens.tolist(),
                                        loaded.output_tokens.tolist(), loaded.hash_ids,
                                        strict=True)]


async def run_demo(plan: DemoPlan, map_wait_s: float, view_url: str) -> int:
    """Wait for the scheduler's map, replay with each policy, print the table; 0 when every
    request of both replays was decided."""
    ready = http_ready(f"{plan.base}/readyz")
    deadline = time.monotonic() + map_wait_s
    ok, why = await ready()
    while not ok and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        ok, why = await ready()
    print(f"netkv up: scheduler {'ready' if ok else 'NOT ready (tier priors)'}: {why}",
          flush=True)
    runs = []
    for i, policy in enumerate(("cache_load", "netkv")):
        print(f"netkv up: replaying {len(plan.requests)} requests with {policy} ...",
              flush=True)
        runs.append(await replay(plan, policy, i))
        await asyncio.sleep(1.0)  # let the map see the link recover before the next policy
    print()
    hot = f"{plan.hot_host}/nic/down" if plan.hot_host else None
    print(table(runs, hot, plan.rate_per_s))
    error = first_error(runs)
    if error:
        print(f"first error: {error}")
    print(f"\nlive view: {view_url} (while the mesh runs: `netkv up`)")
    return 0 if all(r.decisions and not r.errors for r in runs) else 1


def first_error(runs: list[PolicyRun]) -> str | None:
    for r in runs:
        if r.errors:
            return f"{r.policy}: {r.errors[0]}"
    return None


__all__ = ["DemoPlan", "PolicyRun", "default_hot_host", "demo_requests", "first_error", "replay",
           "run_demo", "table"]
