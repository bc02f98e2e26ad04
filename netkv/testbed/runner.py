"""Replay a trace slice once per policy, under the same background schedule, and summarise.

Every policy sees the same requests at the same offsets, the same prefill assignment (round
robin by request index) and the same hot spots, which start ``warmup_s`` before the first
request so that the agents and the oracle have seen them; only the decode choice differs.
Between policies the fabric drains and the scheduler is restarted (fresh bookings and prefix
caches), so runs do not leak into each other.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from netkv.core.topology import Tier
from netkv.errors import InputError
from netkv.testbed.background import Background, Schedule
from netkv.testbed.engines import (
    DecodeEngine,
    EngineModel,
    Outcome,
    PrefillEngine,
    Request,
    Selector,
)
from netkv.testbed.fabric import FabricPlan

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
    """Requests ``start .. start+count`` of a Mooncake-style JSONL trace, arrivals rebased
    to the slice's first request and compressed by ``speedup``."""
    rows: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i < spec.start:
                    continue
                if len(rows) >= spec.count:
                    break
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{i + 1}", f"not JSON: {exc}") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read trace: {exc.strerror}") from None
    if not rows:
        raise InputError(str(path), f"no requests at offset {spec.start}")
    out: list[Request] = []
    t0 = None
    for i, row in enumerate(rows):
        where = f"{path}:{spec.start + i + 1}"
        try:
            ts = float(row["timestamp"]) / 1000.0
            tokens, output = int(row["input_length"]), int(row["output_length"])
            hashes = tuple(int(h) for h in row.get("hash_ids", ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(where, f"bad trace record: {exc}") from None
        if tokens <= 0 or output < 0 or not math.isfinite(ts):
            raise InputError(where, "input_length must be > 0, output_length >= 0")
        t0 = ts if t0 is None else t0
        arrival = min((ts - t0) / spec.speedup, spec.max_span_s)
        out.append(Request(f"r{spec.start + i}", arrival, tokens, output, hashes))
    return out


@dataclass
class PolicyResult:
    policy: str
    outcomes: list[Outcome] = field(default_factory=list)
    hot_crossings: int = 0
    tiers: dict[str, int] = field(default_factory=dict)

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
        }


class Replayer:
    """Owns the engines for one fabric and replays requests under a background schedule."""

    def __init__(self, plan: FabricPlan, model: EngineModel, selector: Selector,
                 schedule: Schedule, spec: ReplaySpec) -> None:
        self.plan, self.model, self.selector = plan, model, selector
        self.schedule, self.spec = schedule, spec
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        t = plan.topology
        self.decoders = {
            i.name: DecodeEngine(i.name, plan.host_ns[i.host], plan.host_addr[i.host],
                                 model=model, clock=self.clock, on_done=self._release,
                                 on_load=self._report)
            for i in t.instances_with_role("decode")}
        self.prefills = [PrefillEngine(i.name, plan.host_ns[i.host], model, self.clock)
                         for i in t.instances_with_role("prefill")]
        self._reports: set[asyncio.Task[None]] = set()
        if not self.decoders or not self.prefills:
            raise InputError("topology", "the testbed needs prefill and decode instances")

    def clock(self) -> float:
        return self._loop.time() - self._t0

    async def _release(self, request_id: str, decode: str) -> None:
        try:
            await self.selector.release(request_id, decode)
        except Exception as exc:  # a failed release must not kill the decode engine
            log.warning("release.failed", request=request_id, error=str(exc))

    def _report(self, engine: DecodeEngine) -> None:
        """Push a decoder's load to the scheduler (as a vLLM metrics scrape would show it)."""
        task = asyncio.create_task(self._push(engine.name, engine.running, engine.waiting,
                                              engine.kv_use))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _push(self, name: str, running: int, waiting: int, kv_use: float) -> None:
        try:
            await self.selector.report_load(name, running, waiting, kv_use)
        except Exception as exc:  # a lost load report must not stop the engine
            log.warning("load_report.failed", decode=name, error=str(exc))

    async def __aenter__(self) -> Replayer:
        for d in self.decoders.values():
            await d.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for d in self.decoders.values():
            await d.stop()
        if self._reports:
            await asyncio.wait(self._reports, timeout=5.0)

    async def replay(self, policy: str, requests: Sequence[Request]) -> PolicyResult:
        """Run every request once under ``policy``; background flows run from ``warmup_s``
        before the first arrival until the schedule ends."""
        result = PolicyResult(policy)
        async with Background(self.plan, self.schedule, self.clock) as background:
            background.start()
            await asyncio.sleep(self.spec.warmup_s)
            start = self.clock()
            tasks = []
            for k, req in enumerate(requests):
                engine = self.prefills[k % len(self.prefills)]
                tasks.append(asyncio.create_task(self._at(start + req.arrival_s, engine, req,
                                                          policy)))
            result.outcomes = list(await asyncio.gather(*tasks))
            await background.stop()
        await asyncio.sleep(self.spec.drain_s)
        self._classify(result, start - self.spec.warmup_s)
        return result

    async def _at(self, when: float, engine: PrefillEngine, req: Request,
                  policy: str) -> Outcome:
        await asyncio.sleep(max(when - self.clock(), 0.0))
        return await engine.serve(req, policy, self.selector, self.decoders)

    def _classify(self, result: PolicyResult, schedule_t0: float) -> None:
        t = self.plan.topology
        for o in result.outcomes:
            if o.error is not None or not o.decode:
                continue
            src = t.instance(o.prefill).host
            dst = t.instance(o.decode).host
            tier = Tier(t.tier(t.host_id(src), t.host_id(dst))).name.lower()
            result.tiers[tier] = result.tiers.get(tier, 0) + 1
            hot = self.schedule.links(o.transfer_start_s - schedule_t0)
            if any(self.plan.crosses(src, dst, link) for link in hot):
                result.hot_crossings += 1


async def run_policies(plan: FabricPlan, model: EngineModel, selector: Selector, *,
                       schedule: Schedule, spec: ReplaySpec, requests: Sequence[Request],
                       policies: Sequence[str],
                       before_each: Callable[[str], Awaitable[None]] | None = None,
                       ) -> dict[str, PolicyResult]:
    """Replay ``requests`` once per policy; ``before_each`` resets the control plane."""
    results: dict[str, PolicyResult] = {}
    async with Replayer(plan, model, selector, schedule, spec) as replayer:
        for policy in policies:
            if before_each is not None:
                await before_each(policy)
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
