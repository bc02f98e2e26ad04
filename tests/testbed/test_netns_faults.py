"""Faults on the emulated fabric: each is applied and reverted for real (the bytes show it),
and the control plane sees it by itself: the oracle's map and the scheduler's decisions move
away from the faulty NIC and come back when it heals, within a bound, at the agents' default
probe and counter intervals. Nothing tells the control plane about a fault; the agents'
counters, qdisc readings and probes are all it has."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis

from netkv.core.congestion import CongestionMap
from netkv.core.topology import Topology
from netkv.core.topology_file import load_topology, parse_topology
from netkv.testbed.controlplane import REDIS_PORT, ControlPlane, Tuning
from netkv.testbed.engines import connect_from, listening_socket
from netkv.testbed.fabric import CONTROL_ADDRESS, FabricPlan, build
from netkv.testbed.faults import Fabric, Fault, Faults, FaultSchedule
from netkv.testbed.netns import Lab, inside

pytestmark = [pytest.mark.netns, pytest.mark.testbed]
FAULTY = "h001"  # a decode host on the prefill's leaf: its best decoder when all is quiet
SOURCE = "h000"
PREFILL = "h000-p0"
SEEN_WITHIN_S = 2.0  # issue 13's target at the default intervals
NBYTES = 2_000_000
# Leaves 4:1 oversubscribed, so on a quiet fabric the decoder on the prefill's own leaf is the
# clear best (its path is the NIC rate, every other path half of it): a fault on that NIC must
# move the choice, and its end must bring it back.
OVERSUBSCRIBED = {
    "fabric": {"nic_gbps": 400, "leaf_oversubscription": 4, "pod_oversubscription": 2},
    "fat_tree": {"pods": 2, "leaves_per_pod": 2, "hosts_per_leaf": 2, "gpus_per_host": 8,
                 "instance_gpus": 8, "role_pattern": "PD"},
}


async def _transfer(plan: FabricPlan, src: str, dst: str, nbytes: int,
                    timeout_s: float = 20.0) -> float:
    """Seconds to move ``nbytes`` from ``src`` to ``dst`` over TCP (until the last byte)."""
    sock = listening_socket(plan.host_ns[dst], plan.host_addr[dst])
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        while got < nbytes and (chunk := await reader.read(65536)):
            got += len(chunk)
        if not done.done():
            done.set_result(time.monotonic())
        writer.close()

    server = await asyncio.start_server(sink, sock=sock)
    try:
        start = time.monotonic()
        _, writer = await connect_from(plan.host_ns[src], plan.host_addr[dst],
                                       sock.getsockname()[1], timeout_s=timeout_s)
        writer.write(bytes(nbytes))
        await writer.drain()
        end = await asyncio.wait_for(done, timeout_s)
        writer.close()
        return end - start
    finally:
        server.close()


def _qdisc_rate(plan: FabricPlan, link: str) -> str:
    port = plan.link_port(link)
    out = subprocess.run(["tc", "-n", port.ns, "qdisc", "show", "dev", port.ifname],
                         capture_output=True, text=True, check=True).stdout
    return out.split(" rate ")[1].split()[0]


def _oper_state(plan: FabricPlan, host: str) -> str:
    out = subprocess.run(["ip", "-n", plan.host_ns[host], "-o", "link", "show", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    return out.split(" state ")[1].split()[0]


@pytest.mark.timeout(120)
def test_each_fault_is_applied_and_reverted_on_the_fabric(
        lab: Lab, small_topology: Topology) -> None:
    plan = FabricPlan.of(small_topology, lab.prefix)
    build(lab, plan)
    nominal = _qdisc_rate(plan, f"{FAULTY}/nic/up")

    async def scenario() -> dict[str, float]:
        out: dict[str, float] = {"quiet": await _transfer(plan, SOURCE, FAULTY, NBYTES)}
        fabric = Fabric(plan)
        degraded = Fault("degraded_nic", FAULTY, 0, 1, factor=0.25)
        await fabric.apply(degraded)
        out["degraded"] = await _transfer(plan, SOURCE, FAULTY, NBYTES)
        out["degraded_rate"] = 1.0 if _qdisc_rate(plan, f"{FAULTY}/nic/down") != nominal \
            else 0.0
        await fabric.revert(degraded)
        out["restored"] = await _transfer(plan, SOURCE, FAULTY, NBYTES)
        down = Fault("link_down", FAULTY, 0, 1)
        await fabric.apply(down)
        out["down_state_is_down"] = float(_oper_state(plan, FAULTY) == "DOWN")
        try:
            await _transfer(plan, SOURCE, FAULTY, NBYTES, timeout_s=2.0)
            out["down_failed"] = 0.0
        except (OSError, TimeoutError):
            out["down_failed"] = 1.0
        await fabric.revert(down)
        out["after_down"] = await _transfer(plan, SOURCE, FAULTY, NBYTES)
        return out

    out = asyncio.run(scenario())
    print({k: round(v, 3) for k, v in out.items()})
    assert _qdisc_rate(plan, f"{FAULTY}/nic/up") == nominal  # reverted exactly
    assert out["degraded_rate"] == 1.0
    assert out["degraded"] > 3.0 * out["quiet"], out  # a quarter of the rate: ~4x as long
    assert out["restored"] < 1.5 * out["quiet"], out
    assert out["down_state_is_down"] == 1.0 and out["down_failed"] == 1.0, out
    assert out["after_down"] < 1.5 * out["quiet"], out
    assert _oper_state(plan, FAULTY) != "DOWN"


def _agent_reports_capacity() -> bool:
    """Does the agent report a NIC's negotiated rate (a tbf root rate on the testbed)?"""
    try:
        samples = importlib.import_module("netkv.contracts.samples")
    except ImportError:
        return False
    return "capacity_bps" in getattr(samples.NicSample, "__struct_fields__", ())


def _module(*names: str) -> Any:
    """The first of these modules that exists (the wire contracts are moving from
    ``netkv.telemetry`` to ``netkv.contracts``; this test reads the map through either)."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(names[-1])


async def _map(redis: aioredis.Redis, topology: Topology) -> CongestionMap | None:
    keys = _module("netkv.contracts.names", "netkv.telemetry.names").RedisKeys()
    data = await redis.get(keys.map_snapshot)
    if data is None:
        return None
    assert isinstance(data, bytes)
    try:
        decode = _module("netkv.contracts.snapshot").decode_snapshot
    except ImportError:
        decode = getattr(CongestionMap, "from_snapshot")  # noqa: B009 (gone after the move)
    cmap = decode(topology, data)
    assert isinstance(cmap, CongestionMap)
    return cmap


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["degraded_nic", "link_down"])
def test_the_control_plane_sees_each_fault_and_its_end_by_itself(
        lab: Lab, tmp_path: Path, kind: str) -> None:
    if kind == "degraded_nic" and not _agent_reports_capacity():
        pytest.skip("the agent does not report a NIC's negotiated rate (capacity_bps) on this "
                    "branch, so a slower NIC is invisible until traffic fills it")
    plan = FabricPlan.of(parse_topology(OVERSUBSCRIBED, "test"), lab.prefix)
    build(lab, plan)
    control = ControlPlane(lab, plan, tmp_path / "run", bytes_per_token=33,
                           tuning=Tuning.agent_defaults())

    async def scenario() -> dict[str, float | None]:
        await control.start()
        t = load_topology(control.topology_path)
        src, dst = t.host_id(SOURCE), t.host_id(FAULTY)
        redis = aioredis.Redis(host=CONTROL_ADDRESS, port=REDIS_PORT)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

        async def seconds() -> float:
            cmap = await _map(redis, t)
            if cmap is None:
                return float("nan")
            est = cmap.estimate(src, np.array([dst]), float(NBYTES))
            return float(est.seconds[0])

        async def decision() -> str:
            async with http.post(control.scheduler_url + "/v1/select", json={
                    "request_id": f"probe-{time.monotonic_ns()}", "prefill": PREFILL,
                    "prompt_tokens": 60000, "policy": "netkv", "reserve": False}) as resp:
                assert resp.status == 200, await resp.text()
                return str((await resp.json())["decode_host"])

        async def watch(since: float, bad: bool, limit_s: float) -> tuple[float | None,
                                                                         float | None]:
            """Seconds from ``since`` (loop clock) until the map shows the fault (``bad``)
            or its end, and until a decision avoids (``bad``) or uses the host again."""
            loop = asyncio.get_running_loop()
            seen = moved = None
            while loop.time() - since < limit_s and (seen is None or moved is None):
                secs = await seconds()
                if seen is None and ((secs > 2.5 * baseline) if bad
                                     else (secs < 1.3 * baseline)):
                    seen = loop.time() - since
                host = await decision()
                if moved is None and ((host != FAULTY) if bad else (host == FAULTY)):
                    moved = loop.time() - since
                await asyncio.sleep(0.05)
            return seen, moved

        try:
            await control.wait_ready(control.scheduler_url + "/readyz", control.scheduler)
            await asyncio.sleep(3.0)  # every agent reporting, probe windows filled
            baseline = await seconds()
            quiet = []
            for _ in range(10):  # a stable choice, or "moved away" would mean nothing
                quiet.append(await decision())
                await asyncio.sleep(0.1)
            quiet_choice = FAULTY if set(quiet) == {FAULTY} else ",".join(quiet)
            loop = asyncio.get_running_loop()
            schedule = FaultSchedule((Fault(kind, FAULTY, 0.0, 8.0),))  # type: ignore[arg-type]
            async with Faults(plan, schedule, loop.time) as faults:
                faults.start()
                (first,) = await faults.wait_events(1, 5.0)
                applied = faults.start_time + first.at_s
                seen, avoided = await watch(applied, bad=True, limit_s=7.5)
                _, second = await faults.wait_events(2, 15.0)
                reverted = faults.start_time + second.at_s
                healed, back = await watch(reverted, bad=False, limit_s=10.0)
        finally:
            await http.close()
            await redis.aclose()
        assert faults.errors == []
        return {"baseline_s": baseline, "quiet_is_faulty_host": float(quiet_choice == FAULTY),
                "map_sees_fault_s": seen, "decision_avoids_s": avoided,
                "map_sees_end_s": healed, "decision_returns_s": back}

    with inside(plan.control_ns):
        out = asyncio.run(scenario())
    print(f"{kind}: " + ", ".join(f"{k}={v if v is None else round(v, 3)}"
                                  for k, v in out.items()))
    assert out["quiet_is_faulty_host"] == 1.0, "the faulty host was not always the quiet choice"
    for key in ("map_sees_fault_s", "decision_avoids_s", "map_sees_end_s",
                "decision_returns_s"):
        value = out[key]
        assert value is not None, f"{kind}: {key} never happened"
        assert value <= 2 * SEEN_WITHIN_S, f"{kind}: {key} = {value:.2f}s"
