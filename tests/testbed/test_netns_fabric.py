"""The emulated fabric moves real bytes at the scaled rates, a hot spot slows exactly the
transfers that cross it, and teardown leaves no namespace, veth or process behind, also after
an exception or a crash of the owner."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from netkv.core.topology import Topology
from netkv.testbed.background import Background, HotSpot, Schedule
from netkv.testbed.engines import connect_from, listening_socket
from netkv.testbed.fabric import CONTROL_ADDRESS, FabricPlan, build
from netkv.testbed.faults import Fabric, Fault
from netkv.testbed.netns import Lab, LabError, list_namespaces, sweep
from netkv.testbed.routers import Pinning, RouterSpec, Worker, router_command

pytestmark = [pytest.mark.netns, pytest.mark.testbed]


def _root_veths() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True,
                         text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


async def _timed_transfer(plan: FabricPlan, src: str, dst: str, nbytes: int) -> float:
    """Seconds to move ``nbytes`` from host ``src`` to host ``dst`` over TCP (until the
    receiver has the last byte)."""
    sock = listening_socket(plan.host_ns[dst], plan.host_addr[dst])
    port = sock.getsockname()[1]
    done = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        while got < nbytes:
            chunk = await reader.read(65536)
            if not chunk:
                break
            got += len(chunk)
        done.set_result(time.monotonic())
        writer.close()

    server = await asyncio.start_server(sink, sock=sock)
    try:
        start = time.monotonic()
        _, writer = await connect_from(plan.host_ns[src], plan.host_addr[dst], port)
        writer.write(bytes(nbytes))
        await writer.drain()
        end: float = await asyncio.wait_for(done, 30.0)
        writer.close()
        return end - start
    finally:
        server.close()


def test_links_run_at_the_scaled_rate_and_a_hot_spot_slows_only_its_paths(
        lab: Lab, small_topology: Topology) -> None:
    plan = FabricPlan.of(small_topology, lab.prefix, scale=1e-4)
    build(lab, plan)
    nbytes = 2_000_000  # 16 Mbit: 0.4 s at the 40 Mb/s NIC rate

    async def scenario() -> tuple[float, float, float]:
        same_leaf = await _timed_transfer(plan, "h000", "h001", nbytes)
        loop = asyncio.get_running_loop()
        schedule = Schedule((HotSpot("pod0/up", 0.0, 20.0, flows=12),))
        async with Background(plan, schedule, loop.time) as background:
            background.start()
            await asyncio.sleep(1.5)
            quiet = await _timed_transfer(plan, "h000", "h002", nbytes)  # same pod
            hot = await _timed_transfer(plan, "h000", "h004", nbytes)  # crosses pod0/up
            await background.stop()
        assert background.bytes_sent > 0
        return same_leaf, quiet, hot

    same_leaf, quiet, hot = asyncio.run(scenario())
    ideal = nbytes * 8 / plan.rate_bps("h000/nic/up")
    assert ideal * 0.9 < same_leaf < ideal * 2.0, (same_leaf, ideal)
    assert quiet < ideal * 2.0, (quiet, ideal)
    assert hot > 1.5 * quiet, (hot, quiet)  # 12 TCP flows share the link with it


def test_teardown_after_an_exception_removes_everything(
        netns_available: None, small_topology: Topology, tmp_path: Path) -> None:
    """Also the peer routers (started as the comparison starts them: pinned, in the control
    namespace) and a fault left applied when the owner failed."""
    veths_before = _root_veths()
    lab = Lab()
    started: list[subprocess.Popen[bytes]] = []
    peers = [k for k in ("vllm-router", "sglang-router")
             if (Path(sys.executable).parent / k).exists()]
    if len(peers) < 2:
        pytest.skip("the peer routers are not installed (pip install 'netkv[peers]')")

    def build_then_fail() -> None:
        with lab:
            plan = FabricPlan.of(small_topology, lab.prefix)
            build(lab, plan)
            started.append(lab.spawn(plan.host_ns["h000"], ["sleep", "300"],
                                     Path(f"/tmp/netkv-test-{lab.run}.log")))
            prefill = [Worker(f"http://{plan.host_mgmt['h000']}:8100", "h000", 5600)]
            decode = [Worker(f"http://{plan.host_mgmt['h001']}:8200", "h001")]
            for k, kind in enumerate(peers):  # they wait for workers that never come
                cmd = router_command(RouterSpec.parse(kind), prefill, decode,
                                     host=CONTROL_ADDRESS, port=8000 + k,
                                     metrics_port=29000 + k)
                started.append(lab.spawn(plan.control_ns, Pinning().wrap(cmd.argv),
                                         tmp_path / f"{kind}.log"))
            asyncio.run(Fabric(plan).apply(Fault("link_down", "h001")))
            assert lab.ledger.path.exists()
            time.sleep(0.5)
            assert all(p.poll() is None for p in started)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_then_fail()
    assert len(started) == 1 + len(peers)
    assert not [n for n in list_namespaces() if n.startswith(lab.prefix)]
    for proc in started:
        assert proc.poll() is not None, proc.args
        assert not psutil.pid_exists(proc.pid)
    # nothing was ever created in the root namespace (Docker's own vethXXXXXXX, from other
    # jobs on a shared machine, may come and go meanwhile; the fabric never names one so)
    appeared = {v for v in _root_veths() - veths_before if not v.startswith("veth")}
    assert not appeared, appeared
    assert not lab.ledger.path.exists()


def test_down_cleans_up_after_the_owner_was_killed(
        netns_available: None, tmp_path: Path) -> None:
    """A process builds a lab, starts a child in a namespace and dies by SIGKILL; `sweep`
    (what `netkv testbed down` runs) removes its namespaces and its child from the ledger."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from netkv.testbed.netns import Lab\n"
        "lab = Lab(ledger_dir=Path(sys.argv[1])).__enter__()\n"
        "ns = lab.add_namespace('h0')\n"
        "lab.add_namespace('h1')\n"
        "lab.add_veth(ns, 'eth0', lab.ns('h1'), 'eth0')\n"
        "p = lab.spawn(ns, ['sleep', '300'], Path(sys.argv[1]) / 'sleep.log')\n"
        "print(json.dumps({'run': lab.run, 'pid': p.pid}), flush=True)\n"
        "time.sleep(300)\n")
    owner = subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert owner.stdout is not None
    info = json.loads(owner.stdout.readline())
    prefix = f"nkv{info['run']}-"
    assert len([n for n in list_namespaces() if n.startswith(prefix)]) == 2
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait(5)
    owner.stdout.close()
    removed = sweep(tmp_path, run=info["run"])
    assert sorted(removed) == [f"{prefix}h0", f"{prefix}h1"]
    assert not [n for n in list_namespaces() if n.startswith(prefix)]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{info['pid']}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{info['pid']}").exists() or \
        Path(f"/proc/{info['pid']}/stat").read_text().split()[2] == "Z"


def test_resume_of_an_unknown_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="no running testbed"):
        Lab.resume("zzzz", tmp_path)
