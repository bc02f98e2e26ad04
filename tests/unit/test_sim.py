"""Simulator invariants, models and the `netkv sim` command on small synthetic traces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import conversation_trace

from netkv.cli import main
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError
from netkv.sim.fabric import Fabric
from netkv.sim.scenario import TelemetrySection, load_scenario
from netkv.sim.simulation import RunConfig, Simulation
from netkv.sim.telemetry import BackgroundHistory, TelemetryView
from netkv.workload.trace import load_trace

pytestmark = pytest.mark.unit


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    return conversation_trace(tmp_path / "trace.jsonl")


def busy_scenario(tmp_path: Path, **over: object) -> str:
    """fat-tree-64 with heavy background so that the flow sharing is exercised."""
    data: dict[str, object] = {"base": "fat-tree-64", "name": "test",
            "background": {"mean_hotspots": 4.0, "mean_duration_s": 5.0}}
    data.update(over)
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("policy", ["round_robin", "cache_load", "llmd_weighted", "netkv",
                                    "netkv_pair"])
def test_every_request_completes_once_and_bytes_are_conserved(
        tmp_path: Path, trace_file: Path, policy: str) -> None:
    scenario = load_scenario(busy_scenario(tmp_path))
    trace = load_trace(trace_file).scaled(rate_scale=4.0)  # compressed: flows overlap
    result = Simulation(scenario, trace).run(RunConfig(policy))
    assert result.completions.tolist() == [1] * len(trace)
    assert np.isfinite(result.ttft_s).all() and np.isfinite(result.tbt_s).all()
    assert result.requested_bytes == pytest.approx(result.kv_bytes.sum())
    assert result.delivered_bytes == pytest.approx(result.requested_bytes, rel=1e-9)
    # TTFT covers at least the prefill and the transfer.
    assert (result.ttft_s >= result.transfer_s).all()
    assert (result.tier >= 0).all()


def test_single_tier_without_background_netkv_and_cache_load_agree(
        tmp_path: Path, trace_file: Path) -> None:
    # One leaf: prefill hosts and decode hosts alternate, every transfer is tier 1, and there
    # is no background traffic: the network term carries no information.
    path = busy_scenario(
        tmp_path, background={"mean_hotspots": 0.0},
        topology={"fat_tree": {"pods": 1, "leaves_per_pod": 1, "hosts_per_leaf": 4,
                               "role_pattern": "PPDD"}})
    scenario = load_scenario(path)
    trace = load_trace(trace_file)
    sim = Simulation(scenario, trace)
    netkv = sim.run(RunConfig("netkv"))
    cache = sim.run(RunConfig("cache_load"))
    assert set(netkv.tier.tolist()) == set(cache.tier.tolist()) == {1}
    assert np.nanmean(netkv.ttft_s) == pytest.approx(np.nanmean(cache.ttft_s), rel=0.02)
    assert np.percentile(netkv.ttft_s, 99) == pytest.approx(np.percentile(cache.ttft_s, 99),
                                                            rel=0.05)


def test_netkv_avoids_congested_paths_that_round_robin_uses(tmp_path: Path,
                                                            trace_file: Path) -> None:
    # Heavy, long hot spots on the core: netkv with the ground truth keeps transfers off it.
    path = busy_scenario(tmp_path, background={"mean_hotspots": 6.0, "mean_duration_s": 60.0,
                                               "min_load": 0.9, "max_load": 0.98},
                         topology={"fat_tree": {"role_pattern": "PPDD"}})
    sim = Simulation(load_scenario(path), load_trace(trace_file))
    rr = sim.run(RunConfig("round_robin"))
    nk = sim.run(RunConfig("netkv", oracle="truth"))
    assert nk.transfer_s.mean() < rr.transfer_s.mean()
    assert np.nanmean(nk.ttft_s) < np.nanmean(rr.ttft_s)


def test_max_min_fair_sharing_with_background() -> None:
    topo = parse_topology({"fabric": {"nic_gbps": 8}, "fat_tree": {}})  # 1 GB/s NICs
    fab = Fabric(topo)
    a = topo.path(0, 1)  # h000 up, h001 down
    b = topo.path(0, 2)  # h000 up, leaf0.0 up, leaf0.1 down, h002 down
    c = topo.path(3, 2)  # h003 up, h002 down
    fab.add(1, a, 1e9)
    fab.add(2, b, 1e9)
    fab.add(3, c, 1e9)
    fab.reallocate()
    rates = {f.request: f.rate for f in fab.flows.values()}
    # h000's NIC is shared by flows 1 and 2 (0.5 GB/s each); h002's NIC gives flow 3 the rest.
    assert rates[1] == pytest.approx(0.5e9) and rates[2] == pytest.approx(0.5e9)
    assert rates[3] == pytest.approx(0.5e9)
    # Background on leaf0.0/up taking 90% squeezes flow 2; the others grow into the room.
    fab.set_background(topo.link_index["leaf0.0/up"], 0.9)
    fab.reallocate()
    rates = {f.request: f.rate for f in fab.flows.values()}
    leaf_cap = topo.capacity[topo.link_index["leaf0.0/up"]]
    assert rates[2] == pytest.approx(0.1 * leaf_cap)
    assert rates[1] == pytest.approx(1e9 - rates[2])
    assert rates[3] == pytest.approx(1e9 - rates[2])
    nxt = fab.reallocate()
    fab.advance(nxt)
    done = fab.finished()
    assert {f.request for f in done} == {1, 3}  # equal rates, equal sizes


def test_telemetry_is_sampled_delayed_and_noisy() -> None:
    topo = parse_topology({"fat_tree": {}})
    link = topo.link_index["pod0/up"]
    cap = topo.capacity[link]
    history = BackgroundHistory(topo.n_links)
    bg = np.zeros(topo.n_links)
    bg[link] = 0.5 * cap
    history.record(10.0, bg)
    spec = TelemetrySection(interval_s=1.0, delay_s=0.5, noise=0.0)
    view = TelemetryView(topo, history, spec, seed=1)
    assert view.refresh(10.2, bg).available_bytes_s[link] == cap  # sample of t=9: idle
    assert view.refresh(10.6, bg).available_bytes_s[link] == pytest.approx(0.5 * cap)
    truth = TelemetryView(topo, history, spec, seed=1, ground_truth=True)
    assert truth.refresh(10.0, bg).available_bytes_s[link] == pytest.approx(0.5 * cap)
    noisy = TelemetryView(topo, history, TelemetrySection(noise=0.3), seed=1)
    seen = noisy.refresh(11.0, bg).available_bytes_s[link]
    assert seen != pytest.approx(0.5 * cap) and 0 < seen < cap


def test_length_scale_keeps_shared_prefixes(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"timestamp": 0, "input_length": 1024, "output_length": 5, "hash_ids": [0, 1]}\n'
        '{"timestamp": 1000, "input_length": 1500, "output_length": 5, "hash_ids": [0, 1, 2]}\n'
        '{"timestamp": 2000, "input_length": 600, "output_length": 5, "hash_ids": [0, 9]}\n')
    trace = load_trace(path)
    longer = trace.scaled(rate_scale=2.0, length_scale=2.0)
    assert longer.input_tokens.tolist() == [2048, 3000, 1200]
    assert longer.arrival_s.tolist() == [0.0, 0.5, 1.0]
    a, b, c = longer.hash_ids
    assert len(a) == 4 and b[:4] == a and len(set(b)) == len(b)
    assert c[:2] == a[:2] and c[2] not in a
    shorter = trace.scaled(length_scale=0.5)
    assert [len(h) for h in shorter.hash_ids] == [1, 2, 1]
    assert shorter.hash_ids[0] == shorter.hash_ids[1][:1]


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("{not json", "not valid JSON"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "hash_ids"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1], "x": 1}',
         ": x"),
        ('{"timestamp": -5, "input_length": 10, "output_length": 1, "hash_ids": [1]}',
         "timestamp"),
        ('{"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [1]}',
         "hash_ids"),
        ('{"timestamp": 0, "input_length": "10", "output_length": 1, "hash_ids": [1]}',
         "input_length"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_trace_line_names_file_line_and_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, field: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}'
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(InputError, match=field):
        load_trace(path)
    rc = main(["sim", "--trace", str(path), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{path}:2" in err and field in err


def test_bad_cli_input_exits_non_zero_naming_the_problem(
        tmp_path: Path, trace_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o")
    base = ["sim", "--trace", str(trace_file), "--out", out, "--no-progress"]
    assert main([*base, "--policies", "netkv,fastest"]) == 2
    assert "unknown policy 'fastest'" in capsys.readouterr().err
    assert main([*base, "--policies", "netkv@psychic"]) == 2
    assert "unknown oracle 'psychic'" in capsys.readouterr().err
    assert main([*base, "--scenario", "fat-tree-9"]) == 2
    assert "unknown scenario 'fat-tree-9'" in capsys.readouterr().err
    bogus = tmp_path / "bogus.yaml"
    bogus.write_text(yaml.safe_dump({"base": "fat-tree-64", "name": "x", "colour": "red"}))
    assert main([*base, "--scenario", str(bogus)]) == 2
    assert "colour: unknown field" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "fat-tree-64", "name": "x", "prefill": {"mfu": 2}}))
    assert main([*base, "--scenario", str(bad)]) == 2
    assert "prefill.mfu: must be <= 1" in capsys.readouterr().err
    assert main([*base, "--rate-scale", "-1"]) == 2
    assert "--rate-scale" in capsys.readouterr().err
    assert main(["sim", "--trace", str(tmp_path / "missing.jsonl"), "--out", out]) == 2
    assert "cannot read trace" in capsys.readouterr().err


def test_sim_command_writes_the_contract(tmp_path: Path, trace_file: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["sim", "--trace", str(trace_file), "--scenario", "fat-tree-64",
               "--policies", "round_robin,cache_load,netkv,netkv@truth", "--out", str(out),
               "--jobs", "1", "--no-progress", "--limit", "80"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "netkv@truth" in printed and "p99" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"] == "fat-tree-64" and summary["trace"] == str(trace_file)
    assert set(summary["policies"]) == {"round_robin", "cache_load", "netkv", "netkv@truth"}
    for row in summary["policies"].values():
        for key in ("ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "slo_attainment", "tbt_mean_s",
                    "decision_p99_us", "kv_bytes_by_tier"):
            assert key in row
        assert row["completed"] == 80
        assert 0.0 <= row["slo_attainment"] <= 1.0
        assert row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert (out / "ttft_cdf.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_writes_table_json_and_plot(tmp_path: Path, trace_file: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    rc = main(["sim", "--trace", str(trace_file), "--policies", "cache_load,netkv",
               "--sweep", "staleness", "--values", "0.1,10", "--out", str(out), "--jobs", "1",
               "--no-progress", "--limit", "60"])
    assert rc == 0
    assert "sweep staleness" in capsys.readouterr().out
    data = json.loads((out / "sweep_staleness.json").read_text())
    assert data["values"] == [0.1, 10.0] and len(data["rows"]) == 4
    assert (out / "sweep_staleness.png").exists()


@pytest.mark.parametrize(("name", "gpus", "hosts"), [
    ("fat-tree-64", 64, 8), ("fat-tree-64-split", 64, 8),
    ("fat-tree-64-split-downlinks", 64, 8), ("fat-tree-1024", 1024, 128)])
def test_shipped_scenarios_parse_and_have_every_tier(name: str, gpus: int, hosts: int) -> None:
    scenario = load_scenario(name)
    topo = scenario.topology
    assert sum(h.gpus for h in topo.hosts) == gpus and topo.n_hosts == hosts
    assert scenario.model.bytes_per_token == 327680
    decode_hosts = np.array(sorted({topo.host_index[i.host]
                                    for i in topo.instances_with_role("decode")}))
    prefill_host = topo.host_index[topo.instances_with_role("prefill")[0].host]
    tiers = set(topo.tiers(prefill_host, decode_hosts).tolist())
    assert {1, 2, 3} <= tiers  # same leaf, same pod, across the core
    assert scenario.free_memory_bytes(4) > 0
    for policy in scenario.spec.policies:
        assert policy in {"cache_load", "llmd_weighted", "least_loaded"}


def test_runs_are_deterministic_and_background_is_seeded(tmp_path: Path,
                                                         trace_file: Path) -> None:
    from netkv.sim.fabric import hot_spots

    scenario = load_scenario(busy_scenario(tmp_path))
    topo = scenario.topology
    spec = scenario.spec.background
    a = hot_spots(topo, spec, 600.0, seed=5)
    assert a == hot_spots(topo, spec, 600.0, seed=5) and a != hot_spots(topo, spec, 600.0, 6)
    assert hot_spots(topo, spec, 600.0, seed=5, intensity=0.0) == []
    kinds = {topo.links[s.link].kind.value for s in a}
    assert kinds <= set(spec.links) and all(0 <= s.start_s < s.end_s for s in a)
    sim = Simulation(scenario, load_trace(trace_file).scaled(rate_scale=3.0))
    first = sim.run(RunConfig("netkv"))
    second = sim.run(RunConfig("netkv"))
    np.testing.assert_array_equal(first.ttft_s, second.ttft_s)
    np.testing.assert_array_equal(first.tier, second.tier)
