"""Both testbed replays send their requests through the one streamed request of
``netkv.testbed.client``, each with its own first-token read and clock: the policy replay
times TTFT at the first body bytes on ``time.monotonic``, the router comparison at the first
whole SSE line on the event loop's clock, naming engine addresses (pure: the request itself is
recorded here; tests/integration/test_testbed_client.py sends it to a real server)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from netkv.core.topology import Topology
from netkv.testbed import compare, runner
from netkv.testbed.background import Schedule
from netkv.testbed.engines import EngineModel, Outcome, Request
from netkv.testbed.fabric import FabricPlan
from netkv.testbed.faults import preset

pytestmark = pytest.mark.unit

REQ = Request("r1", 0.0, 512, 4, (1,))


def _recording(calls: list[dict[str, Any]]) -> Any:
    async def stream_request(http: Any, url: str, req: Request, **kw: Any) -> Outcome:
        calls.append({"url": url, "req": req, **kw})
        return Outcome(req.request_id, "")
    return stream_request


async def test_the_policy_replay_times_the_first_chunk_on_the_monotonic_clock(
        small_topology: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(runner, "stream_request", _recording(calls))
    plan = FabricPlan.of(small_topology, "nkvtest-")
    replay = runner.ProxyReplay(plan, EngineModel(), Schedule(()), runner.ReplaySpec(),
                                runner.MapEndpoints())
    await replay._at(None, "http://proxy", 0.0, REQ, prompt=[1, 2], policy="netkv")  # type: ignore[arg-type]
    assert calls == [{"url": "http://proxy", "req": REQ, "prompt": [1, 2], "policy": "netkv",
                      "t0": replay._t0, "first_token": "chunk"}]
    assert abs(replay._t0 - time.monotonic()) < 60  # the default clock's zero is monotonic


async def test_the_router_comparison_times_the_first_line_on_the_loops_clock(
        small_topology: Topology, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(compare, "stream_request", _recording(calls))
    plan = FabricPlan.of(small_topology, "nkvtest-")
    comparison = compare.RouterComparison(
        plan, EngineModel(), preset("quiet", plan, 10.0), runner.ReplaySpec(),
        spawn=lambda argv, log: None, workdir=tmp_path, shared_config={})  # type: ignore[arg-type,return-value]
    names = {"127.0.0.1:9": "h000-p0"}
    await comparison._at(None, "http://router", 0.0, REQ, prompt=[3], label="vllm-router:rr",  # type: ignore[arg-type]
                         names=names)
    assert calls == [{"url": "http://router", "req": REQ, "prompt": [3],
                      "policy": "vllm-router:rr", "t0": comparison._t0,
                      "clock": asyncio.get_running_loop().time, "first_token": "line",
                      "names": names}]
