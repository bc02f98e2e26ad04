"""The per-NIC byte-counter view (netkv/sim/telemetry.py ``NicByteView``): how an instance's
transfers really split over the NICs it is bound to, from the NICs' byte counters and the
scheduler's own landed bytes, worked by hand; and the fabric's counters it reads."""

from __future__ import annotations

import numpy as np
import pytest

from netkv.core.topology import IntArray, Topology
from netkv.core.topology_file import parse_topology
from netkv.sim.fabric import KV, Fabric, nic_offsets
from netkv.sim.scenario import TelemetrySection, load_scenario
from netkv.sim.simulation import RunConfig, Simulation
from netkv.sim.stages import Run
from netkv.sim.telemetry import NicByteView
from netkv.workload.trace import Trace

pytestmark = pytest.mark.unit
GB = 1e9
SPEC = TelemetrySection(interval_s=0.5, delay_s=0.13)


def _hosts() -> tuple[Topology, Fabric, IntArray, IntArray]:
    # 2 hosts of 8 GPUs with 8 NICs of 1 GB/s; two TP4 instances per host: host a runs two
    # prefills (NICs 0-3 and 4-7), host b two decoders.
    topo = parse_topology({
        "fabric": {"nic_gbps": 64.0},
        "hosts": [{"name": "a", "leaf": "l", "pod": "p"}, {"name": "b", "leaf": "l", "pod": "p"}],
        "instances": [{"name": f"{h}{k}", "role": r, "host": h, "gpus": 4}
                      for h, r in (("a", "prefill"), ("b", "decode")) for k in (0, 1)]})
    fab = Fabric(topo, nics=8, count_nics=True)
    first, width = nic_offsets(topo, 8)
    return topo, fab, first, width


def _view(mode: str = "telemetry", window_s: float = 1.0
          ) -> tuple[Topology, Fabric, NicByteView]:
    topo, fab, first, width = _hosts()
    return topo, fab, NicByteView(topo, fab, first, width, SPEC, mode=mode, min_bytes=0.1 * GB,
                                  window_s=window_s)


def _nics(topo: Topology, fab: Fabric, host: int, up: bool) -> list[int]:
    chain = topo.up_chain if up else topo.down_chain
    return [int(x) for x in fab.members[int(chain[host, 0])]]


def _window(topo: Topology, fab: Fabric, tx_a: list[float], rx_b: list[float]
            ) -> np.ndarray:
    """One window's per-NIC bytes: host a's transmit counters and host b's receive ones."""
    out = np.zeros(fab.n_phys)
    out[_nics(topo, fab, 0, True)] = tx_a
    out[_nics(topo, fab, 1, False)] = rx_b
    return out


def test_a_skewed_host_shows_one_stripe() -> None:
    topo, fab, view = _view()
    alive = np.ones(fab.n_phys, dtype=bool)
    sent = np.array([4 * GB, 0.0, 0.0, 0.0])  # a0 sent 4 GB (one 1 GB share per bound NIC)
    received = np.array([0.0, 0.0, 4 * GB, 0.0])  # into b0
    # Every byte of a0 on its first NIC: NICs 1-3 carried nothing of their 1 GB shares, so
    # its transfers ran on 4 - 3 = 1 stripe; b0 received on its four NICs as bound.
    nic = _window(topo, fab, [4 * GB, 0, 0, 0, 0, 0, 0, 0], [GB, GB, GB, GB, 0, 0, 0, 0])
    assert view.estimate(nic, sent, received, alive) == pytest.approx([0.25, 1, 1, 1])
    # Half the stripes skipped (NICs 2, 3 below half their share): 2 of 4.
    nic = _window(topo, fab, [2 * GB, 1.5 * GB, 0.4 * GB, 0.1 * GB, 0, 0, 0, 0],
                  [GB, GB, GB, GB, 0, 0, 0, 0])
    assert view.estimate(nic, sent, received, alive) == pytest.approx([0.5, 1, 1, 1])
    # The receiving side counts for a decoder: b1 received 2 GB, all on b's NIC 0 (not its).
    received = np.array([0.0, 0.0, 0.0, 2 * GB])
    nic = _window(topo, fab, [GB, GB, GB, GB, 0, 0, 0, 0], [2 * GB, 0, 0, 0, 0, 0, 0, 0])
    assert view.estimate(nic, sent, received, alive) == pytest.approx([1, 1, 1, 0.25])


def test_a_balanced_host_keeps_its_stripes_whatever_else_it_carries() -> None:
    topo, fab, view = _view()
    alive = np.ones(fab.n_phys, dtype=bool)
    sent = np.array([4 * GB, 2 * GB, 0.0, 0.0])
    received = np.array([0.0, 0.0, 3 * GB, 3 * GB])
    # Each bound NIC carried at least half its share; other traffic (a prefix fetch hashed
    # onto NIC 2, 5 GB) only adds, and a share just under the full one (edge of the window)
    # is not short.
    nic = _window(topo, fab, [GB, 0.9 * GB, 6 * GB, GB, 0.5 * GB, 0.5 * GB, 0.5 * GB, 0.6 * GB],
                  [0.75 * GB] * 8)
    assert view.estimate(nic, sent, received, alive) == pytest.approx([1, 1, 1, 1])
    # A NIC that is down carried nothing but is not short: its stripe moved to another NIC.
    dead = alive.copy()
    dead[_nics(topo, fab, 0, True)[3]] = False
    nic = _window(topo, fab, [GB, GB, GB, 0, GB, GB, GB, GB], [0.75 * GB] * 8)
    assert view.estimate(nic, sent, received, dead) == pytest.approx([1, 1, 1, 1])
    assert view.estimate(nic, sent, received, alive) == pytest.approx([0.75, 1, 1, 1])


def test_too_little_traffic_keeps_the_nominal_striping_or_the_last_estimate() -> None:
    topo, fab, view = _view()
    alive = np.ones(fab.n_phys, dtype=bool)
    skewed = _window(topo, fab, [0.05 * GB, 0, 0, 0, 0, 0, 0, 0], [0] * 8)
    little = np.array([0.05 * GB, 0.0, 0.0, 0.0])  # under min_bytes (0.1 GB): says nothing
    none = np.zeros(4)
    assert view.estimate(skewed, little, none, alive) == pytest.approx([1, 1, 1, 1])
    # Once a window with enough traffic showed the skew, a quiet window keeps it.
    view.values.append(view.estimate(skewed * 40, little * 40, none, alive))
    assert view.values[-1] == pytest.approx([0.25, 1, 1, 1])
    assert view.estimate(skewed, little, none, alive) == pytest.approx([0.25, 1, 1, 1])
    # And a window with enough balanced traffic replaces it.
    balanced = _window(topo, fab, [GB] * 4 + [0] * 4, [0] * 8)
    assert view.estimate(balanced, np.array([4 * GB, 0, 0, 0]), none,
                         alive) == pytest.approx([1, 1, 1, 1])


def test_the_skew_is_seen_only_after_the_window_and_the_sampling_delay() -> None:
    topo, fab, view = _view(window_s=1.0)  # two samples of 0.5 s
    assert view.lag == 2
    fab.skewed.add(0)
    view.sample(0.0)
    view.sample(0.5)
    # At 1 s a0 sends 4 GB to b0 in 4 stripes; host a is skewed, so all four take its NIC 0
    # (1 GB/s): 4 s. Sampled every 0.5 s meanwhile, nothing has landed: nothing is trusted.
    fab.advance(1.0)
    for j in range(4):
        phys = fab.resolve(topo.path(0, 1), 7, j, nic_src=0, nic_dst=0, src_host=0,
                           dst_host=1)
        fab.add(7, phys, GB, kind=KV, sub=j, physical=True)
    fab.reallocate()
    for k in range(2, 10):
        view.sample(0.5 * k)
    assert view.at(4.9) == pytest.approx([1, 1, 1, 1])
    fab.advance(5.0)
    fab.finished()
    tx = _nics(topo, fab, 0, True)
    assert [fab.nic_bytes[i] for i in tx[:4]] == pytest.approx([4 * GB, 0, 0, 0])
    view.landed(0, 2, 4 * GB, 1.0, 5.0)  # the scheduler learns it landed
    # The 5.0 s sample's window (4.0-5.0 s) does not hold the whole transfer (1-5 s): it says
    # nothing (its stripes need not have progressed together).
    view.sample(5.0)
    assert view.at(5.2) == pytest.approx([1, 1, 1, 1])
    # A second transfer, 0.4 GB at 5.0-5.4 s, lies within the window of the 5.5 s sample:
    # 0.1 GB due on each bound NIC; NIC 0 carried 0.4 GB, NICs 1-3 nothing: one stripe. b0
    # received its shares on its four NICs, as bound. Seen 0.13 s later.
    for j in range(4):
        phys = fab.resolve(topo.path(0, 1), 8, j, nic_src=0, nic_dst=0, src_host=0,
                           dst_host=1)
        fab.add(8, phys, 0.1 * GB, kind=KV, sub=j, physical=True)
    fab.reallocate()
    fab.advance(5.4)
    fab.finished()
    view.landed(0, 2, 0.4 * GB, 5.0, 5.4)
    view.sample(5.5)
    assert view.at(5.5 + 0.12) == pytest.approx([1, 1, 1, 1])
    assert view.at(5.5 + 0.13) == pytest.approx([0.25, 1, 1, 1])
    # Later quiet windows keep it; a static table never sees it; the truth sees it at once.
    view.sample(6.0)
    view.sample(6.5)
    assert view.at(6.7) == pytest.approx([0.25, 1, 1, 1])
    assert NicByteView(topo, fab, *nic_offsets(topo, 8), SPEC, mode="static",
                       min_bytes=0.1 * GB).at(6.2) == pytest.approx([1, 1, 1, 1])
    truth = NicByteView(topo, fab, *nic_offsets(topo, 8), SPEC, mode="truth", min_bytes=0.1 * GB)
    assert truth.at(0.0) == pytest.approx([0.25, 0.25, 1, 1])  # both instances of host a
    fab.skewed.clear()
    assert truth.at(0.0) == pytest.approx([1, 1, 1, 1])


def test_the_fabric_counts_every_flow_on_its_nics_without_changing_it() -> None:
    topo, fab, _ = _view()
    links = topo.path(0, 1)
    for j in range(4):
        phys = fab.resolve(links, 1, j, nic_src=0, nic_dst=0)
        fab.add(1, phys, GB, kind=KV, sub=j, physical=True)
    fab.reallocate()
    # A sample mid-way reads the counters as they will be, without advancing the flows.
    mid = fab.nic_bytes_at(0.5)
    tx, rx = _nics(topo, fab, 0, True), _nics(topo, fab, 1, False)
    assert mid[tx[:4]] == pytest.approx([0.5 * GB] * 4) and mid[rx[4:]] == pytest.approx([0] * 4)
    assert fab.now == 0.0 and all(f.remaining == GB for f in fab.flows.values())
    fab.advance(2.0)
    fab.finished()
    got = np.array(fab.nic_bytes)
    assert got[tx[:4]] == pytest.approx([GB] * 4) and got[rx[:4]] == pytest.approx([GB] * 4)
    assert got.sum() == pytest.approx(8 * GB)  # each byte once at each end, nowhere else
    assert fab.delivered_bytes == pytest.approx(4 * GB)


def test_the_skewed_host_reaches_the_policy_and_nothing_else_moves() -> None:
    scenario = load_scenario("fat-tree-64-faults")
    n = 49  # bursts of 7 at once every 2 s (so most prefills get some), 8192 tokens each
    trace = Trace("t", np.repeat(np.arange(7) * 2.0, 7), np.full(n, 8192), np.full(n, 4),
                  tuple(tuple(range(16 * r, 16 * r + 16)) for r in range(n)))
    # Round-robin spreads h005's prefills over every decoder (netkv keeps these on the host);
    # it does not read NIC rates, so the run gives it no counters: switched on here.
    run = Run(Simulation(scenario, trace), RunConfig("round_robin"))
    assert not run.fabric.count_nics and run.byte_view.mode == "static"
    run.fabric.count_nics = True
    run.byte_view.mode = "telemetry"
    h005 = run.topo.host_index["h005"]
    p = next(k for k, i in enumerate(run.prefill_instances)
             if int(run.topo.instance_host[i]) == h005)
    nominal = float(run.prefill_nic[p])
    run.execute()
    factors = run.byte_view.at(run.horizon)
    skewed = run.topo.instance_host == h005
    # h005's prefill sent off-host (the plan gives it some of each burst): its stripes were seen
    # on one NIC, and the policy was told a quarter of its bound rate.
    mine = run.prefill_of == p
    assert np.any(mine & (run.decodes.host[run.decode_of] != h005))
    assert factors[run.prefill_instances[p]] == pytest.approx(0.25)
    assert float(run.prefill_nic[p]) == pytest.approx(nominal / 4)
    assert np.all(factors[~skewed] == 1.0)  # no other instance is taken for skewed
    static = Run(Simulation(scenario, trace), RunConfig("netkv", oracle="static"))
    static.execute()
    assert np.all(static.byte_view.at(static.horizon) == 1.0)
    assert not static.fabric.count_nics
    live = Run(Simulation(scenario, trace), RunConfig("netkv"))
    assert live.fabric.count_nics and live.byte_view.mode == "telemetry"
