"""Topology, paths, tiers, the topology file and the static tier oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from netkv.core.costmodel import CostOracle, static_tier_oracle
from netkv.core.topology import Tier
from netkv.core.topology_file import load_topology, parse_topology
from netkv.errors import InputError

pytestmark = pytest.mark.unit

FAT_TREE = {"fabric": {"nic_gbps": 400, "pod_oversubscription": 4}, "fat_tree": {}}


def test_fat_tree_layout_has_every_tier() -> None:
    topo = parse_topology(FAT_TREE)
    assert len(topo.hosts) == 8
    assert len(topo.instances) == 16  # two 4-GPU instances per 8-GPU host
    assert {i.role for i in topo.instances} == {"prefill", "decode"}
    tiers = topo.tiers(0, np.arange(8))
    assert tiers.tolist() == [0, 1, 2, 2, 3, 3, 3, 3]
    assert topo.tier(0, 7) is Tier.CROSS_CORE


def test_paths_cross_the_right_links() -> None:
    topo = parse_topology(FAT_TREE)
    names = [topo.links[i].name for i in topo.path(0, 7)]
    assert names == ["h000/nic/up", "leaf0.0/up", "pod0/up", "pod1/down", "leaf1.1/down",
                     "h007/nic/down"]
    assert [topo.links[i].name for i in topo.path(0, 1)] == ["h000/nic/up", "h001/nic/down"]
    assert [topo.links[i].name for i in topo.path(3, 3)] == ["h003/fabric"]
    # The vectorised form agrees with the scalar one for every pair.
    for src in range(8):
        _, links, mask = topo.path_matrix(src, np.arange(8))
        for dst in range(8):
            assert set(links[dst][mask[dst]].tolist()) == set(topo.path(src, dst))


def test_oversubscription_shrinks_the_nominal_share() -> None:
    topo = parse_topology(FAT_TREE)
    share = topo.nominal_share()
    nic = 400e9 / 8
    assert share[topo.link_index["h000/nic/up"]] == pytest.approx(nic)
    assert share[topo.link_index["leaf0.0/up"]] == pytest.approx(nic)  # 1:1 at the leaf
    assert share[topo.link_index["pod0/up"]] == pytest.approx(nic / 4)  # 4:1 at the pod


def test_static_oracle_orders_tiers_and_scales_with_bytes() -> None:
    topo = parse_topology(FAT_TREE)
    oracle = static_tier_oracle(topo)
    assert isinstance(oracle, CostOracle)
    est = oracle.estimate(0, np.arange(8), 4e9)
    assert est.tier.tolist() == [0, 1, 2, 2, 3, 3, 3, 3]
    assert np.all(np.diff(est.seconds[[0, 1, 2, 4]]) > 0)
    assert est.seconds[4] == pytest.approx(est.latency_s[4] + 4e9 / (400e9 / 8 / 4))
    assert np.all(est.confidence == 0) and np.all(np.isinf(est.age_s))
    per_dst = oracle.estimate(0, np.array([1, 1]), np.array([1e9, 2e9]))
    assert per_dst.seconds[1] > per_dst.seconds[0]


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"fat_tree": {"pods": 0}}, "fat_tree.pods"),
        ({"fat_tree": {"instance_gpus": 3}}, "fat_tree.instance_gpus"),
        ({"fat_tree": {}, "hosts": [{"name": "a", "leaf": "l", "pod": "p"}]}, "fat_tree"),
        ({"fabric": {"nic_gbps": -1}, "fat_tree": {}}, "fabric.nic_gbps"),
        ({"fabric": {"leaf_oversubscription": "x"}, "fat_tree": {}}, "fabric.leaf_oversub"),
        ({"hosts": [{"name": "a", "leaf": "l", "pod": "p"}],
          "instances": [{"name": "i", "role": "decode", "host": "zz"}]}, "instances[0].host"),
        ({"hosts": [{"name": "a", "leaf": "l", "pod": "p"}],
          "instances": [{"name": "i", "role": "both", "host": "a"}]}, "instances[0].role"),
        ({"hosts": [{"name": "a", "leaf": "l", "pod": "p", "colour": 1}]}, "hosts[0].colour"),
        ({"hosts": [{"name": "a", "leaf": "l", "pod": "p"},
                    {"name": "a", "leaf": "l", "pod": "p"}]}, "hosts[1].name"),
        ({"hosts": [{"name": "a", "leaf": "l", "pod": "p", "address": "nope"}]},
         "hosts[0].address"),
        ({"hosts": []}, "hosts"),
    ],
)
def test_bad_topology_names_the_field(data: dict[str, object], where: str) -> None:
    with pytest.raises(InputError) as info:
        parse_topology(data)
    assert where in str(info.value)


def test_topology_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "topo.yaml"
    bad.write_text("hosts:\n  - {name: a, leaf: l\n")
    with pytest.raises(InputError, match=r"topo\.yaml:\d+"):
        load_topology(bad)
    good = tmp_path / "ok.yaml"
    good.write_text("hosts:\n  - {name: a, leaf: l, pod: p, nic_gbps: 100}\n"
                    "instances:\n  - {name: d0, role: decode, host: a}\n")
    topo = load_topology(good)
    assert topo.capacity[topo.link_index["a/nic/up"]] == pytest.approx(100e9 / 8)
    with pytest.raises(InputError, match="missing.yaml"):
        load_topology(tmp_path / "missing.yaml")
