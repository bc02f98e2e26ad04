"""Router specs and command lines, fault schedules and their timing (pure: the fabric calls
are recorded by a subclass here; tests/testbed/test_netns_faults.py makes them for real)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from netkv.core.topology import Topology
from netkv.errors import InputError
from netkv.testbed.fabric import FabricPlan
from netkv.testbed.faults import (
    Fabric,
    Fault,
    Faults,
    FaultSchedule,
    decode_hosts,
    first_after,
    moving_hot_spot,
    preset,
)
from netkv.testbed.routers import Pinning, RouterSpec, Worker, parse_routers, router_command

pytestmark = pytest.mark.unit


@pytest.fixture
def plan(small_topology: Topology) -> FabricPlan:
    return FabricPlan.of(small_topology, "nkvtest-")


# -- routers ------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "kind", "policy", "label"), [
    ("netkv", "netkv", "netkv", "netkv"),
    ("cache_load", "netkv", "cache_load", "cache_load"),
    ("netkv:round_robin", "netkv", "round_robin", "round_robin"),
    ("vllm-router:cache_aware", "vllm-router", "cache_aware", "vllm-router:cache_aware"),
    ("vllm-router", "vllm-router", "round_robin", "vllm-router:round_robin"),
    (" sglang-router:power_of_two ", "sglang-router", "power_of_two",
     "sglang-router:power_of_two"),
])
def test_router_specs(text: str, kind: str, policy: str, label: str) -> None:
    spec = RouterSpec.parse(text)
    assert (spec.kind, spec.policy, spec.label) == (kind, policy, label)
    assert spec.mode == ("bootstrap" if kind == "sglang-router" else "pull")


@pytest.mark.parametrize(("text", "match"), [
    ("vllm-router:kv_aware", "ZMQ KV-cache events"),
    ("vllm-router:nope", "unknown vllm-router policy"),
    ("nope", "unknown netkv policy"),
    ("dynamo:x", "unknown router 'dynamo'"),
    ("netkv,netkv", "named twice"),
    (" , ", "at least one"),
])
def test_bad_router_lists_name_the_problem(text: str, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        parse_routers(text)
    assert info.value.where == "--routers"


def _workers() -> tuple[list[Worker], list[Worker]]:
    return ([Worker("http://198.19.0.2:8100", "h000", bootstrap_port=5600)],
            [Worker("http://198.19.0.3:8200", "h001"), Worker("http://198.19.0.5:8200", "h003")])


def test_command_lines() -> None:
    prefill, decode = _workers()
    netkv = router_command(RouterSpec("netkv", "netkv"), prefill, decode, host="198.19.0.1",
                           port=8000, metrics_port=29000, netkv_args=["--topology", "t.yaml"])
    argv = netkv.argv
    assert argv[argv.index("--policy") + 1] == "netkv" and "--topology" in argv
    assert "http://198.19.0.3:8200=h001" in argv and "http://198.19.0.2:8100=h000" in argv
    assert netkv.ready_url == "http://198.19.0.1:8000/health"
    peer = router_command(RouterSpec("vllm-router", "power_of_two"), prefill, decode,
                          host="198.19.0.1", port=8000, metrics_port=29001).argv
    assert "--vllm-pd-disaggregation" in peer and peer[peer.index("--kv-connector") + 1] == "nixl"
    assert peer[peer.index("--prometheus-port") + 1] == "29001"
    assert [peer[i + 1] for i, a in enumerate(peer) if a == "--decode"] == [
        "http://198.19.0.3:8200", "http://198.19.0.5:8200"]
    sgl = router_command(RouterSpec("sglang-router", "round_robin"), prefill, decode,
                         host="198.19.0.1", port=8000, metrics_port=29002).argv
    i = sgl.index("--prefill")
    assert sgl[i + 1: i + 3] == ["http://198.19.0.2:8100", "5600"]  # the bootstrap port
    with pytest.raises(InputError, match="bootstrap"):
        router_command(RouterSpec("sglang-router", "round_robin"),
                       [Worker("http://198.19.0.2:8100", "h000")], decode, host="h", port=1,
                       metrics_port=2)


def test_pinning_wraps_every_router_alike() -> None:
    pin = Pinning(cpus=(1,), nice=5)
    assert pin.wrap(["x", "-y"]) == ["taskset", "-c", "1", "nice", "-n", "5", "x", "-y"]
    with pytest.raises(InputError, match="router-nice"):
        Pinning(cpus=(0,), nice=40)


# -- fault schedules -----------------------------------------------------------------------
def test_schedule_files_are_validated(plan: FabricPlan) -> None:
    schedule = FaultSchedule.parse({
        "faults": [{"kind": "degraded_nic", "host": "h001", "start_s": 2, "end_s": 8},
                   {"kind": "link_down", "host": "h003", "start_s": 1, "end_s": 3}],
        "hot_spots": [{"link": "leaf0.0/up", "start_s": 0, "end_s": 4}]})
    schedule.check(plan)
    assert schedule.duration_s == 8
    assert schedule.faulty_links(2.5) == {"h001/nic/up", "h001/nic/down", "h003/nic/up",
                                          "h003/nic/down"}
    assert schedule.hot_links(3.5) == {"h001/nic/up", "h001/nic/down", "leaf0.0/up"}
    assert schedule.faults[0].factor == 0.25
    for bad, match in [
        ({"faults": [{"kind": "melt", "host": "h001"}]}, "faults.+kind"),
        ({"faults": [{"kind": "link_down", "host": "h001", "start_s": 5, "end_s": 1}]},
         "after start_s"),
        ({"faults": [{"kind": "degraded_nic", "host": "h001", "factor": 1.5}]}, "factor"),
        ({"faults": [{"kind": "link_down", "host": "h001", "color": "red"}]}, "unknown field"),
    ]:
        with pytest.raises(InputError, match=match):
            FaultSchedule.parse(bad, "f.yaml")
    with pytest.raises(InputError, match="not a testbed host"):
        FaultSchedule((Fault("link_down", "h999"),)).check(plan)
    with pytest.raises(InputError, match="overlaps"):
        FaultSchedule((Fault("link_down", "h001", 0, 5),
                       Fault("degraded_nic", "h001", 4, 6))).check(plan)


def test_presets_are_fixed_fractions_of_the_replay(plan: FabricPlan) -> None:
    assert decode_hosts(plan)[0] == "h001"
    (f,) = preset("degraded-nic", plan, 50.0).faults
    assert (f.kind, f.host, f.start_s, f.end_s, f.factor) == ("degraded_nic", "h001", 10, 40,
                                                              0.25)
    (g,) = preset("failed-rail", plan, 50.0, host="h003").faults
    assert (g.kind, g.host, g.start_s, g.end_s) == ("link_down", "h003", 15, 35)
    assert preset("quiet", plan, 50.0) == FaultSchedule()
    spots = preset("moving-hot-spot", plan, 40.0).hot_spots
    assert [s.link for s in spots] == ["leaf0.0/up", "leaf0.1/up", "leaf1.0/up", "leaf1.1/up"]
    assert [s.start_s for s in spots] == [0, 10, 20, 30]
    assert moving_hot_spot(plan, 8.0, steps=2)[1].end_s == 8.0
    with pytest.raises(InputError, match="unknown schedule"):
        preset("stormy", plan, 10.0)


class RecordingFabric(Fabric):
    def __init__(self, plan: FabricPlan) -> None:
        super().__init__(plan)
        self.calls: list[tuple[str, str, float]] = []

    async def set_rate(self, link: str, rate_bps: float) -> None:
        self.calls.append(("rate", link, rate_bps))

    async def set_link(self, host: str, up: bool) -> None:
        self.calls.append(("link", host, float(up)))


async def test_faults_apply_and_revert_on_time(plan: FabricPlan) -> None:
    loop = asyncio.get_running_loop()
    fabric = RecordingFabric(plan)
    schedule = FaultSchedule((Fault("degraded_nic", "h001", 0.05, 0.15, factor=0.25),
                              Fault("link_down", "h003", 0.1, 0.2)))
    nominal = plan.rate_bps("h001/nic/up")
    async with Faults(plan, schedule, loop.time, fabric) as faults:
        faults.start()
        await faults.wait_events(4, 5.0)  # two applies and two reverts, on the loop clock
    assert fabric.calls == [
        ("rate", "h001/nic/up", nominal * 0.25), ("rate", "h001/nic/down", nominal * 0.25),
        ("link", "h003", 0.0),
        ("rate", "h001/nic/up", nominal), ("rate", "h001/nic/down", nominal),
        ("link", "h003", 1.0)]
    actions = [(e.kind, e.action) for e in faults.events]
    assert actions == [("degraded_nic", "apply"), ("link_down", "apply"),
                       ("degraded_nic", "revert"), ("link_down", "revert")]
    for e, due in zip(faults.events, (0.05, 0.1, 0.15, 0.2), strict=True):
        assert due <= e.at_s < due + 0.1, (e, due)


async def test_leaving_early_reverts_what_was_applied(plan: FabricPlan) -> None:
    loop = asyncio.get_running_loop()
    fabric = RecordingFabric(plan)
    schedule = FaultSchedule((Fault("link_down", "h001", 0.0, 60.0),
                              Fault("link_down", "h003", 30.0, 60.0)))
    async with Faults(plan, schedule, loop.time, fabric) as faults:
        faults.start()
        await faults.wait_events(1, 5.0)  # h001 down; h003's fault is 30 s away
    assert fabric.calls == [("link", "h001", 0.0), ("link", "h001", 1.0)]  # h003 never came
    assert [e.action for e in faults.events] == ["apply", "revert"]


def test_first_after() -> None:
    assert first_after([1.0, 2.0, 3.0, 4.0], [True, False, True, True], 1.5) == 3.0
    assert first_after([1.0, 2.0], [True, False], 1.5) is None


# -- the comparison's bookkeeping (pure) -----------------------------------------------------
def test_the_pair_comes_from_the_proxy_headers_or_the_vllm_router_request_id() -> None:
    from netkv.testbed.client import identify
    from netkv.testbed.engines import Outcome

    names = {"127.0.0.1:4001": "h000-p0", "127.0.0.1:4002": "h001-d0"}
    kv = {"x-netkv-kv-bytes": "1000", "x-netkv-kv-start": "105.5", "x-netkv-kv-end": "106.0"}
    proxy = Outcome("r1", "")
    identify(proxy, {"x-netkv-prefill": "h002-p0", "x-netkv-decode": "h003-d0", **kv},
             b"data: {}\n", names, 100.0)
    assert (proxy.prefill, proxy.decode, proxy.kv_bytes) == ("h002-p0", "h003-d0", 1000)
    assert (proxy.transfer_start_s, proxy.transfer_s) == (5.5, 0.5)
    peer = Outcome("r2", "")
    line = (b'data: {"id": "___prefill_addr_127.0.0.1:4001___decode_addr_127.0.0.1:4002_'
            b'c79c9c50fedc4c5e", "choices": []}\n')
    identify(peer, kv, line, names, 100.0)
    assert (peer.prefill, peer.decode) == ("h000-p0", "h001-d0")
    unknown = Outcome("r3", "")
    identify(unknown, kv, b'data: {"id": "cmpl-1"}\n', names, 100.0)
    assert (unknown.prefill, unknown.decode) == ("", "")  # never guessed


def test_reaction_and_table(plan: FabricPlan, tmp_path: Path) -> None:
    from netkv.testbed.engines import Outcome
    from netkv.testbed.routerrun import RouterRun, format_comparison, reaction, write_comparison
    from netkv.testbed.runner import PolicyResult

    def o(rid: str, decode: str, at: float) -> Outcome:
        return Outcome(rid, "h000-p0", decode=decode, arrival_s=at - 1, transfer_start_s=at,
                       kv_bytes=1000,
                       transfer_end_s=at + 0.1, first_token_s=at + 0.2)

    schedule = FaultSchedule((Fault("degraded_nic", "h001", 2.0, 6.0),))
    outcomes = [o("a", "h001-d0", 10.5), o("b", "h001-d0", 13.0), o("c", "h003-d0", 14.0),
                o("d", "h001-d0", 17.5)]
    run = RouterRun(RouterSpec("netkv", "netkv"), PolicyResult("netkv", outcomes))
    got = reaction(run, plan, schedule, schedule_t0=10.0)
    assert got == {"uses_before_fault": 1.0, "uses_during_fault": 1.0,
                   "last_use_during_fault_s": 1.0, "first_use_after_fault_s": 1.5}
    run.reaction = got
    assert "netkv" in format_comparison({"netkv": run})
    path = write_comparison(tmp_path, {"netkv": run}, {"faults": "degraded-nic"})
    assert json.loads(path.read_text())["routers"]["netkv"]["reaction"] == got
    assert len((tmp_path / "router-requests.jsonl").read_text().splitlines()) == 4
