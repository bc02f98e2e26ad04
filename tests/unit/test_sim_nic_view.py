"""What the simulated policies are told about the NICs their instances are bound to, and
when their transfers are booked (as the scheduler and the proxy book them)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from netkv.core.policies.prediction import nic_bound_booked
from netkv.core.policies.views import CandidateView, RequestView
from netkv.core.topology import FloatArray, IntArray, Topology
from netkv.core.topology_file import parse_topology
from netkv.sim.fabric import Fabric, nic_offsets
from netkv.sim.scenario import TelemetrySection, load_scenario
from netkv.sim.simulation import RunConfig, Simulation
from netkv.sim.stages import Run
from netkv.sim.telemetry import NicRateView, bound_nic_rates
from netkv.workload.trace import Trace

pytestmark = pytest.mark.unit
GB = 1e9


def _two_instances_per_host() -> tuple[Topology, Fabric, IntArray, IntArray]:
    # 2 hosts of 8 GPUs with 8 NICs of 1 GB/s; two TP4 instances per host (NICs 0-3, 4-7).
    topo = parse_topology({
        "fabric": {"nic_gbps": 64.0},
        "hosts": [{"name": "a", "leaf": "l", "pod": "p"}, {"name": "b", "leaf": "l", "pod": "p"}],
        "instances": [{"name": f"{h}{k}", "role": r, "host": h, "gpus": 4}
                      for h, r in (("a", "prefill"), ("b", "decode")) for k in (0, 1)]})
    fab = Fabric(topo, nics=8)
    first, width = nic_offsets(topo, 8)
    return topo, fab, first, width


def test_bound_rates_are_the_stripes_times_the_slowest_nic() -> None:
    topo, fab, first, width = _two_instances_per_host()
    assert list(first) == [0, 4, 0, 4] and list(width) == [4, 4, 4, 4]
    assert bound_nic_rates(topo, fab, first, width) == pytest.approx([4 * GB] * 4)
    # NIC 1 of host a at a quarter of its rate: a striped transfer of a0 waits for it.
    nic1 = fab.members[int(topo.up_chain[0, 0])][1:2]
    fab.scale_capacity(nic1, 0.25)
    assert bound_nic_rates(topo, fab, first, width) == pytest.approx([1 * GB, 4 * GB,
                                                                      4 * GB, 4 * GB])
    # Down: its stripe moves to another NIC of the host; the other three are full rate.
    fab.scale_capacity(nic1, 0.0)
    assert bound_nic_rates(topo, fab, first, width) == pytest.approx([4 * GB] * 4)
    # A receive-side fault counts too (the lower of the two directions).
    fab.scale_capacity(nic1, 1.0)
    rx = fab.members[int(topo.down_chain[1, 0])][6:7]
    fab.scale_capacity(rx, 0.5)
    assert bound_nic_rates(topo, fab, first, width) == pytest.approx([4 * GB, 4 * GB,
                                                                      4 * GB, 2 * GB])


def test_nic_rates_are_seen_on_the_telemetry_schedule() -> None:
    nominal = np.array([4.0, 4.0])
    spec = TelemetrySection(interval_s=0.5, delay_s=0.13)
    slow = np.array([1.0, 4.0])
    view = NicRateView(nominal, spec, "telemetry")
    assert view.at(10.0) is nominal
    view.record(10.2, slow)  # a fault at 10.2 s: in the sample of 10.5 s, seen at 10.63 s
    assert view.at(10.62) is nominal
    assert view.at(10.63) is slow
    truth = NicRateView(nominal, spec, "truth")
    truth.record(10.2, slow)
    assert truth.at(10.2) is slow
    static = NicRateView(nominal, spec, "static")
    static.record(10.2, slow)
    assert static.at(100.0) is nominal  # a static table sees no fault


def decoder_nic(run: Run) -> FloatArray:
    rates = run.decodes.nic_bytes_s
    assert rates is not None
    return rates


def test_a_degraded_nic_reaches_the_policy() -> None:
    scenario = load_scenario("fat-tree-64-faults")
    trace = Trace("t", np.array([0.0, 1.0]), np.array([1024, 1024]), np.array([4, 4]),
                  ((0, 1), (2, 3)))
    run = Run(Simulation(scenario, trace), RunConfig("netkv"))
    h002 = run.topo.host_index["h002"]
    mine = [i for i, inst in enumerate(run.topo.instances)
            if int(run.topo.instance_host[i]) == h002]
    assert [int(run.nic_first[i]) for i in mine] == [0, 4]  # prefill on NICs 0-3, decode 4-7
    p = run.prefill_instances.index(mine[0])
    d = run.decode_instances.index(mine[1])
    nominal = float(run.prefill_nic[p])
    assert decoder_nic(run)[d] == nominal
    run.execute()
    # h002's NIC 1 is at a quarter from the start: the prefill striped over NICs 0-3 is seen
    # at 4 stripes x a quarter NIC; the decoder on NICs 4-7 keeps its rate, as does every
    # other host's instance.
    assert float(run.prefill_nic[p]) == pytest.approx(nominal / 4)
    assert decoder_nic(run)[d] == nominal
    others = np.delete(run.prefill_nic, p)
    assert np.all(others == nominal)


def test_transfers_are_booked_when_decided() -> None:
    scenario = load_scenario("fat-tree-64-split")
    trace = Trace("t", np.array([0.0]), np.array([4096]), np.array([8]), (tuple(range(8)),))
    run = Run(Simulation(scenario, trace), RunConfig("netkv"))
    booked: list[int] = []
    handover = run.handover

    def spy(now: float, r: int, b: int) -> None:  # the handover starts the bytes
        booked.append(run.engine.bookings.active)
        handover(now, r, b)

    run.handover = spy  # type: ignore[method-assign,assignment]  # execute looks it up
    result = run.execute()
    assert booked == [1]  # booked at the decision, before the handover ended
    assert run.engine.bookings.active == 0  # and released when it landed
    assert np.isfinite(result.ttft_s[0])


def test_booked_transfers_share_the_bound_nics_by_hand() -> None:
    cands = CandidateView(host=np.array([1, 2, 0]), running=np.zeros(3, np.int64),
                          waiting=np.zeros(3, np.int64), kv_use=np.zeros(3),
                          capacity_tokens=np.full(3, 1e6), nic_bytes_s=np.full(3, GB),
                          nic_booked_bytes=np.array([0.0, 0.5 * GB, 9 * GB]),
                          nic_booked_flows=np.array([0.0, 1.0, 3.0]))
    nbytes = np.full(3, GB)
    tier = np.array([1, 2, 0])
    base = np.full(3, 0.1)
    idle = RequestView(prefill_host=0, prompt_tokens=1, kv_bytes_per_token=1.0,
                       src_nic_bytes_s=GB)
    # Each side's floor is (bytes + min(booked, flows x bytes)) / rate; same host: no NICs.
    got = nic_bound_booked(base, tier, nbytes, request=idle, candidates=cands,
                           dst_nic=cands.nic_bytes_s, index=None)
    assert got == pytest.approx([1.0, 1.5, 0.1])
    busy = replace(idle, src_nic_booked_bytes=2 * GB, src_nic_booked_flows=1.0)
    got = nic_bound_booked(base, tier, nbytes, request=busy, candidates=cands,
                           dst_nic=cands.nic_bytes_s, index=None)
    assert got == pytest.approx([2.0, 2.0, 0.1])  # min(2 GB, 1 flow x 1 GB) ahead of it
    picked = nic_bound_booked(base[1:], tier[1:], nbytes[1:], request=idle, candidates=cands,
                              dst_nic=np.full(2, GB), index=np.array([1, 2]))
    assert picked == pytest.approx([1.5, 0.1])


def test_the_simulator_books_each_transfer_on_both_instances_nics() -> None:
    scenario = load_scenario("fat-tree-64-split")
    trace = Trace("t", np.array([0.0, 0.0]), np.array([4096, 4096]), np.array([8, 8]),
                  (tuple(range(8)), tuple(range(8, 16))))
    run = Run(Simulation(scenario, trace), RunConfig("netkv"))
    seen: list[tuple[float, float]] = []
    handover = run.handover

    def spy(now: float, r: int, b: int) -> None:
        seen.append((float(run.prefill_booked[:, 1].sum()),
                     float(run.decodes.nic_booked_flows.sum())))
        handover(now, r, b)

    run.handover = spy  # type: ignore[method-assign,assignment]  # execute looks it up
    run.execute()
    assert seen and all(p >= 1 and d >= 1 for p, d in seen)
    assert run.prefill_booked.sum() == 0 and run.decodes.nic_booked_flows.sum() == 0
    assert run.decodes.nic_booked_bytes.sum() == 0
