"""The simulator's fabric: max-min fairness with elastic background (hand-worked), ECMP
hashing, a degraded or failed NIC, the layer-wise overlap formula, and the intervals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from netkv.core.policies.timing import layerwise_exposed_s, pulled_exposed_s
from netkv.core.topology import LinkKind
from netkv.core.topology_file import parse_topology
from netkv.sim.fabric import INF, KV, TENANT, Fabric
from netkv.sim.scenario import TenantSection, load_scenario
from netkv.sim.simulation import RunConfig, Simulation
from netkv.sim.sources import tenant_episodes
from netkv.sim.stats import ci95, paired, reduction_pct, t975, verdict
from netkv.workload.trace import load_trace

pytestmark = pytest.mark.unit
GB = 1e9


def topo(nic_gbps: float = 8.0, **fat_tree: int):  # type: ignore[no-untyped-def]
    return parse_topology({"fabric": {"nic_gbps": nic_gbps}, "fat_tree": fat_tree or {}})


def rates(fab: Fabric) -> dict[tuple[int, int, int], float]:
    fab.reallocate()
    return {k: f.rate for k, f in fab.flows.items()}


# -- max-min fairness with elastic background ------------------------------------------------
def test_one_kv_flow_and_one_elephant_split_a_link_in_half() -> None:
    t = topo()  # 1 GB/s NICs
    fab = Fabric(t)
    nic = t.up_chain[0, 0]
    fab.add(1, t.path(0, 1), GB)
    fab.add(7, (int(nic),), INF, kind=TENANT, physical=True)
    r = rates(fab)
    assert r[(KV, 1, 0)] == pytest.approx(0.5 * GB)
    assert r[(TENANT, 7, 0)] == pytest.approx(0.5 * GB)


def test_capped_elephants_leave_the_rest_to_the_kv_flow() -> None:
    t = topo()
    fab = Fabric(t)
    nic = int(t.up_chain[0, 0])
    fab.add(1, t.path(0, 1), GB)
    for j in range(3):  # three elephants capped at 0.1 GB/s: 0.3 taken, 0.7 left
        fab.add(7, (nic,), INF, kind=TENANT, sub=j, cap=0.1 * GB, physical=True)
    r = rates(fab)
    assert r[(KV, 1, 0)] == pytest.approx(0.7 * GB)
    assert all(r[(TENANT, 7, j)] == pytest.approx(0.1 * GB) for j in range(3))


def test_progressive_filling_across_two_links_by_hand() -> None:
    # Flow A: h000 -> h002 (h000 NIC up, leaf0.0 up, leaf0.1 down, h002 NIC down).
    # Elephant E on leaf0.0's uplink (2 GB/s: two 1 GB/s hosts, non-blocking). Flow B on
    # h000's NIC only (h000 -> h001). h000's NIC (1 GB/s) is the first bottleneck: A and B
    # get 0.5 each; E takes what is left of the uplink: 2 - 0.5 = 1.5.
    t = topo()
    fab = Fabric(t)
    up = t.link_index["leaf0.0/up"]
    fab.add(1, t.path(0, 2), GB)
    fab.add(2, t.path(0, 1), GB)
    fab.add(9, (up,), INF, kind=TENANT, physical=True)
    r = rates(fab)
    assert r[(KV, 1, 0)] == pytest.approx(0.5 * GB)
    assert r[(KV, 2, 0)] == pytest.approx(0.5 * GB)
    assert r[(TENANT, 9, 0)] == pytest.approx(1.5 * GB)
    # Three more elephants on the uplink: four elephants and A share 2 GB/s -> 0.4 each,
    # then B takes the rest of h000's NIC: 1 - 0.4 = 0.6.
    for j in range(1, 4):
        fab.add(9, (up,), INF, kind=TENANT, sub=j, physical=True)
    r = rates(fab)
    assert r[(KV, 1, 0)] == pytest.approx(0.4 * GB)
    assert r[(KV, 2, 0)] == pytest.approx(0.6 * GB)
    assert sum(r[(TENANT, 9, j)] for j in range(4)) == pytest.approx(1.6 * GB)
    # The inelastic knob instead takes a fixed 90% and never yields.
    inel = Fabric(t)
    inel.add(1, t.path(0, 2), GB)
    inel.set_background(up, 0.9)
    assert rates(inel)[(KV, 1, 0)] == pytest.approx(0.2 * GB)  # 10% of 2 GB/s


def test_truth_is_the_share_a_newcomer_would_get() -> None:
    t = topo()
    fab = Fabric(t)
    nic = int(t.up_chain[0, 0])
    fab.add(7, (nic,), INF, kind=TENANT, physical=True)  # one elephant fills the NIC
    fab.reallocate()
    # Counters show the NIC full; a new flow would still get half of it.
    assert fab.unavailable(include_own=False)[nic] == pytest.approx(GB)
    assert fab.truth_unavailable()[nic] == pytest.approx(0.5 * GB)


# -- ECMP hashing ------------------------------------------------------------------------------
def test_ecmp_hashes_subflows_onto_spines_consistently_and_collides() -> None:
    t = topo(nic_gbps=32.0)  # 4 GB/s NICs
    fab = Fabric(t, spines=4, salt=3)
    up, down = t.link_index["leaf0.0/up"], t.link_index["leaf0.1/down"]
    path = t.path(0, 2)
    seen = []
    for key in range(400):
        phys = fab.resolve(path, key, 0)
        assert phys == fab.resolve(path, key, 0)  # deterministic
        i_up = int(np.flatnonzero(fab.members[up] == phys[1])[0])
        i_down = int(np.flatnonzero(fab.members[down] == phys[2])[0])
        assert i_up == i_down  # one spine for both hops
        seen.append(i_up)
    counts = np.bincount(seen, minlength=4)
    assert counts.min() > 60  # all four spines used, roughly evenly
    # Two subflows hashed onto the same spine share its member link (a collision).
    member_cap = fab.nominal[fab.members[up][0]]
    keys = [k for k in range(400) if seen[k] == seen[0]][:2]
    for k in keys:
        fab.add(k, path, GB)
    r = rates(fab)
    assert [r[(KV, k, 0)] for k in keys] == pytest.approx([member_cap / 2] * 2)


# -- degraded and failed NICs ------------------------------------------------------------------
def test_a_degraded_nic_slows_every_transfer_striped_over_it() -> None:
    t = topo(nic_gbps=32.0)  # 4 NICs of 1 GB/s
    fab = Fabric(t, nics=4)
    path = t.path(0, 1)
    for j in range(4):
        phys = fab.resolve(path, 1, j, nic_src=0, nic_dst=0)
        fab.add(1, phys, GB, sub=j, physical=True)

    def transfer_done() -> float:  # the transfer ends with its slowest subflow
        fab.reallocate()
        return max(f.remaining / f.rate for f in fab.flows.values())

    assert transfer_done() == pytest.approx(1.0)  # 1 GB per NIC at 1 GB/s
    slow = fab.members[t.up_chain[0, 0]][1:2]
    fab.scale_capacity(slow, 0.25)  # NIC 1 negotiated at a quarter of its rate
    assert transfer_done() == pytest.approx(4.0)  # the whole transfer waits for it
    # A failed NIC is skipped by new transfers (they re-stripe over the others).
    fab.scale_capacity(slow, 0.0)
    phys = fab.resolve(path, 2, 1, nic_src=0, nic_dst=0)
    assert phys[0] != int(slow[0])
    # A skewed host sends everything over its first NIC.
    fab.skewed.add(0)
    assert {fab.resolve(path, 3, j, nic_src=0, nic_dst=0, src_host=0)[0]
            for j in range(4)} == {int(fab.members[t.up_chain[0, 0]][0])}


# -- tenants ------------------------------------------------------------------------------------
def test_tenant_episodes_hit_the_hot_fraction_with_lognormal_dwell() -> None:
    t = topo(pods=2, leaves_per_pod=2, hosts_per_leaf=2)
    spec = TenantSection(hot_fraction=0.125, dwell_median_s=2.0)
    eps = tenant_episodes(t, spec, 20_000.0, seed=4)
    eligible = [i for i, lk in enumerate(t.links)
                if lk.kind in (LinkKind.LEAF_UP, LinkKind.POD_UP, LinkKind.POD_DOWN)]
    on = sum(e.end_s - e.start_s for e in eps) / (20_000.0 * len(eligible))
    assert on == pytest.approx(0.125, rel=0.15)
    dwell = np.array([e.end_s - e.start_s for e in eps[:-50]])
    assert np.median(dwell) == pytest.approx(2.0, rel=0.15)
    assert {e.link for e in eps} <= set(eligible)
    assert all(spec.flows_min <= e.flows <= spec.flows_max for e in eps)
    assert tenant_episodes(t, spec, 100.0, seed=4) == tenant_episodes(t, spec, 100.0, seed=4)


# -- the layer-wise overlap formula -----------------------------------------------------------
def _by_layers(nbytes: float, rate: float, prefill: float, layers: int) -> float:
    finish = 0.0
    for layer in range(1, layers + 1):
        finish = max(finish, prefill * layer / layers) + nbytes / layers / rate
    return finish - prefill


@pytest.mark.parametrize(("nbytes", "rate", "prefill", "layers"), [
    (4e9, 50e9, 1.0, 80),  # network far faster: only the last layer shows (1 ms)
    (4e9, 1e9, 1.0, 80),  # 4 s of transfer behind 1 s of prefill
    (4e9, 4e9, 1.0, 80),  # equal: a layer's worth left
    (1e6, 1e9, 0.0, 1), (3e9, 2e9, 2.0, 4)])
def test_layerwise_exposed_matches_the_layer_by_layer_schedule(
        nbytes: float, rate: float, prefill: float, layers: int) -> None:
    assert layerwise_exposed_s(nbytes, rate, prefill, layers) == pytest.approx(
        _by_layers(nbytes, rate, prefill, layers))


def test_layerwise_hand_cases_and_pull() -> None:
    assert layerwise_exposed_s(4e9, 50e9, 1.0, 80) == pytest.approx(0.08 / 80)
    assert layerwise_exposed_s(4e9, 1e9, 1.0, 80) == pytest.approx(4.0 - 79 / 80)
    assert layerwise_exposed_s(0.0, 1e9, 1.0, 80) == 0.0
    assert pulled_exposed_s(4e9, 1e9, handover_s=0.05) == pytest.approx(4.05)
    with pytest.raises(ValueError, match="rate"):
        layerwise_exposed_s(1.0, 0.0, 1.0, 80)


def _two_host_scenario(tmp_path: Path, nic_gbps: float, timing: str) -> str:
    data = {"base": "fat-tree-64", "name": "two-hosts",
            "topology": {"fabric": {"nic_gbps": nic_gbps},
                         "fat_tree": {"pods": 1, "leaves_per_pod": 1, "hosts_per_leaf": 2,
                                      "role_pattern": "PPDD"}},
            "network": {"nics_per_host": 1, "spines_per_pod": 1, "timing": timing,
                        "handover_s": 0.0},
            "background": {"tenants": {"hot_fraction": 0.0}, "prefix_fetch": False}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("nic_gbps", [3200.0, 16.0])
def test_simulated_streaming_exposes_what_the_formula_says(tmp_path: Path,
                                                           nic_gbps: float) -> None:
    trace_path = tmp_path / "t.jsonl"
    trace_path.write_text('{"timestamp": 0, "input_length": 8192, "output_length": 4, '
                          f'"hash_ids": {list(range(16))}}}\n')
    trace = load_trace(trace_path)
    pull = Simulation(load_scenario(_two_host_scenario(tmp_path, nic_gbps, "pull")), trace)
    stream = Simulation(load_scenario(_two_host_scenario(tmp_path, nic_gbps, "layerwise")),
                        trace)
    p = pull.run(RunConfig("round_robin"))
    s = stream.run(RunConfig("round_robin"))
    nbytes = float(p.kv_bytes[0])
    rate = nic_gbps * 1e9 / 8
    prefill = float(p.prefill_s[0])
    assert float(p.transfer_s[0]) == pytest.approx(nbytes / rate, rel=1e-3)
    # The simulator streams as a fluid (the L -> infinity limit of the formula).
    expected = max(nbytes / rate - prefill, 0.0)
    assert float(s.transfer_s[0]) == pytest.approx(expected, abs=1e-3 + 0.01 * expected)
    assert layerwise_exposed_s(nbytes, rate, prefill, 10_000) == pytest.approx(
        expected, abs=1e-3)
    assert s.ttft_s[0] <= p.ttft_s[0]


# -- confidence intervals ---------------------------------------------------------------------
def test_ci95_by_hand() -> None:
    iv = ci95([1.0, 2.0, 3.0])  # mean 2, s = 1, t(0.975, 2) = 4.303
    assert iv.mean == 2.0 and iv.half == pytest.approx(4.303 / math.sqrt(3))
    assert ci95([5.0, 5.0, 5.0, 5.0, 5.0]).half == 0.0
    assert ci95([2.0]).half == math.inf
    assert t975(4) == 2.776 and t975(100) == 1.96
    with pytest.raises(ValueError, match="no values"):
        ci95([])


def test_paired_comparisons_and_verdicts() -> None:
    netkv = [1.00, 1.10, 0.95, 1.05, 1.00]
    other = [1.10, 1.21, 1.04, 1.16, 1.10]  # ~10% worse on every seed
    diff = paired(netkv, other)
    assert diff.mean == pytest.approx(-0.102) and diff.high < 0
    assert verdict(diff) == "win"
    assert verdict(paired(other, netkv)) == "loss"
    assert verdict(paired(netkv, netkv)) == "tie"
    noisy = paired([1.0, 1.2, 0.9, 1.1, 1.0], [1.1, 1.0, 1.0, 1.0, 1.05])
    assert verdict(noisy) == "tie"
    red = reduction_pct(netkv, other)
    assert red.mean == pytest.approx(100 * (1 - np.mean(np.array(netkv) / np.array(other))))
    with pytest.raises(ValueError, match="same seeds"):
        paired([1.0], [1.0, 2.0])


def test_matrix_command_writes_intervals_and_verdicts(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from netkv.cli import main

    rng = np.random.default_rng(2)
    lines = []
    for i in range(240):
        n = int(rng.integers(600, 9000))
        ids = [0, *range(1000 * i + 1, 1000 * i + math.ceil(n / 512))]
        lines.append(f'{{"timestamp": {i * 250}, "input_length": {n}, "output_length": '
                     f'{int(rng.integers(1, 50))}, "hash_ids": {ids}}}')
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(lines) + "\n")
    out = tmp_path / "m"
    rc = main(["sim", "matrix", "--trace", str(trace), "--scenarios", "fat-tree-64",
               "--policies", "round_robin,cache_load,netkv@static,netkv", "--seeds", "2",
               "--no-sensitivity", "--out", str(out), "--jobs", "1", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "netkv vs best baseline" in printed and "wall" in printed
    report = yaml.safe_load((out / "matrix.json").read_text())  # JSON is YAML
    table = report["scenarios"]["fat-tree-64"]
    assert set(table["policies"]) == {"round_robin", "cache_load", "netkv@static", "netkv"}
    cell = table["policies"]["netkv"]["ttft_mean_s"]
    assert cell["n"] == 2 and cell["ci95"] >= 0
    assert table["best_baseline"] in {"round_robin", "cache_load"}
    for against in ("best_baseline", "static", "round_robin"):
        assert table["netkv_vs"][against]["verdict_mean_ttft"] in {"win", "tie", "loss"}
    assert "cache_load" in report["tuned"]["fat-tree-64"]
    assert report["score_requests"] + report["tune_requests"] < 240  # disjoint slices
    assert (out / "matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "matrix.md").read_text().startswith("# NetKV simulation matrix")


def test_vectorised_and_small_water_filling_agree() -> None:
    t = topo(nic_gbps=32.0, pods=2, leaves_per_pod=2, hosts_per_leaf=2)
    rng = np.random.default_rng(9)
    for trial in range(20):
        fab = Fabric(t, nics=4, spines=2, salt=trial)
        for r in range(int(rng.integers(1, 30))):
            src, dst = (int(x) for x in rng.choice(t.n_hosts, 2, replace=False))
            cap = float(rng.uniform(0.05, 2.0)) * GB if rng.random() < 0.4 else INF
            fab.add(r, t.path(src, dst), GB, sub=int(rng.integers(4)), cap=cap)
        flows = list(fab.flows.values())
        fab._fill(flows)
        big = [f.rate for f in flows]
        fab.version += 1
        fab._fill_small(flows)
        assert [f.rate for f in flows] == pytest.approx(big, rel=1e-9)
