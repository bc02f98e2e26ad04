"""The agents' view of the namespace testbed: a link the background schedule congests shows
up congested in the oracle's map within a couple of seconds, and the scheduler's decisions
move away from it. The decoders on the prefill's side of the link report nearly full KV memory,
so on a quiet network `netkv` sends the burst across the link; once the map shows the link
congested, waiting for local memory beats crossing it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from helpers import until

from netkv.adapters.topology_file import load_topology
from netkv.contracts.names import RedisKeys
from netkv.contracts.snapshot import decode_snapshot
from netkv.core.congestion import CongestionMap
from netkv.core.topology import Topology
from netkv.testbed.background import Background, HotSpot, Schedule
from netkv.testbed.controlplane import REDIS_PORT, ControlPlane
from netkv.testbed.fabric import CONTROL_ADDRESS, FabricPlan, build
from netkv.testbed.netns import Lab, inside

pytestmark = [pytest.mark.netns, pytest.mark.testbed]
HOT = "pod0/up"
PREFILL = "h000-p0"  # in pod0: its transfers to pod1 cross pod0/up
BURST = 8


async def _map(redis: aioredis.Redis, topology: Topology) -> CongestionMap | None:
    data = await redis.get(RedisKeys().map_snapshot)
    if data is None:
        return None
    assert isinstance(data, bytes)
    return decode_snapshot(topology, data)


async def _congested(redis: aioredis.Redis, topology: Topology, link: int) -> bool:
    cmap = await _map(redis, topology)
    if cmap is None:
        return False
    return bool(cmap.available()[link] < 0.5 * cmap.capacity[link])


async def _load_local_decoders(http: aiohttp.ClientSession, url: str, plan: FabricPlan) -> None:
    """Report the decoders on PREFILL's side of the hot link as nearly out of KV memory (as
    their vLLM metrics would), so that on a quiet network the best choice is across it."""
    t = plan.topology
    src = t.instance(PREFILL).host
    for inst in t.instances_with_role("decode"):
        if not plan.crosses(src, inst.host, HOT):
            async with http.post(url + "/v1/instances", json={
                    "name": inst.name, "running": 8, "waiting": 0, "kv_use": 0.999}) as resp:
                assert resp.status == 200, await resp.text()


async def _burst(http: aiohttp.ClientSession, url: str, tag: str, plan: FabricPlan
                 ) -> tuple[int, list[dict[str, Any]]]:
    """A burst of reserved decisions from PREFILL; how many would cross the hot link."""
    await _load_local_decoders(http, url, plan)
    answers = []
    for i in range(BURST):
        async with http.post(url + "/v1/select", json={
                "request_id": f"{tag}-{i}", "prefill": PREFILL, "prompt_tokens": 60000,
                "policy": "netkv"}) as resp:
            assert resp.status == 200, await resp.text()
            answers.append(await resp.json())
    for i in range(BURST):
        async with http.post(url + "/v1/release", json={"request_id": f"{tag}-{i}"}) as resp:
            assert resp.status == 200
    src = plan.topology.instance(PREFILL).host
    crossing = sum(plan.crosses(src, a["decode_host"], HOT) for a in answers)
    return crossing, answers


@pytest.mark.timeout(240)
def test_a_congested_link_shows_in_the_map_and_decisions_leave_it(
        lab: Lab, small_topology: Topology, tmp_path: Path) -> None:
    plan = FabricPlan.of(small_topology, lab.prefix)
    build(lab, plan)
    control = ControlPlane(lab, plan, tmp_path / "run", bytes_per_token=33)

    async def scenario() -> tuple[float, int, int]:
        await control.start()
        control_topology = load_topology(control.topology_path)
        link = control_topology.link_index[HOT]
        redis = aioredis.Redis(host=CONTROL_ADDRESS, port=REDIS_PORT)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                await control.wait_ready(control.scheduler_url + "/readyz", control.scheduler)
                await asyncio.sleep(2.0)  # a few map versions with every agent reporting
                assert not await _congested(redis, control_topology, link)
                quiet, _ = await _burst(http, control.scheduler_url, "quiet", plan)
                loop = asyncio.get_running_loop()
                schedule = Schedule((HotSpot(HOT, 0.0, 60.0, flows=12),))
                async with Background(plan, schedule, loop.time) as background:
                    background.start()
                    started = time.monotonic()
                    await until(lambda: _congested(redis, control_topology, link), 10.0,
                                step_s=0.1, what=f"{HOT} congested in the map")
                    seen = time.monotonic() - started
                    await asyncio.sleep(1.0)
                    hot, _ = await _burst(http, control.scheduler_url, "hot", plan)
                    await background.stop()
        finally:
            await redis.aclose()
        return seen, quiet, hot

    with inside(plan.control_ns):
        seen, quiet, hot = asyncio.run(scenario())
    print(f"{HOT} congested in the map after {seen:.2f}s; burst transfers across it: "
          f"{quiet}/{BURST} quiet, {hot}/{BURST} congested")
    assert seen <= 2.5
    assert quiet > 0, "the quiet burst never used the link: the test could not show a move"
    assert hot < quiet
