"""`netkv up`'s pure parts: the Redis URL split (password out of what is printed), the demo's
hot host, the demo requests, the table's arithmetic."""

from __future__ import annotations

import re

import pytest

from netkv.core.topology_file import load_topology
from netkv.errors import InputError
from netkv.mesh.demo import Decision, PolicyRun, default_hot_host, demo_requests, table
from netkv.mesh.inputs import split_redis_url
from netkv.up import demo_topology_path

pytestmark = pytest.mark.unit


def test_the_redis_password_leaves_the_url_and_is_redacted_in_what_is_shown() -> None:
    section, shown = split_redis_url("redis://app:s3cret@10.1.2.3:6380/2")
    assert section == {"url": "redis://10.1.2.3:6380/2", "password": "s3cret",
                       "username": "app"}
    assert shown == "redis://app:***@10.1.2.3:6380/2"
    section, shown = split_redis_url("redis://:pw@127.0.0.1:6379/0")
    assert section == {"url": "redis://127.0.0.1:6379/0", "password": "pw"}
    assert "pw" not in shown
    assert split_redis_url("redis://127.0.0.1:6379/0") == (
        {"url": "redis://127.0.0.1:6379/0"}, "redis://127.0.0.1:6379/0")
    with pytest.raises(InputError, match="--redis-url"):
        split_redis_url("http://127.0.0.1:6379")


def test_the_demo_runs_on_split_hosts_and_heats_the_second_decode_host() -> None:
    topo = load_topology(demo_topology_path(split=True))
    roles = {i.host: i.role for i in topo.instances}
    assert [roles[h.name] for h in topo.hosts] == ["prefill", "decode"] * 4
    assert default_hot_host(topo) == "h003"


def test_demo_requests_default_to_the_embedded_workload() -> None:
    requests = demo_requests(None, 50)
    assert len(requests) == 50
    assert all(r["block_hashes"][0] == 0 and r["prompt_tokens"] > 0 for r in requests)


def test_the_table_counts_hot_link_crossings_per_stretch() -> None:
    def run(policy: str, crossed_hot: int, crossed_quiet: int) -> PolicyRun:
        r = PolicyRun(policy)
        for i in range(10):
            r.decisions.append(Decision(i, True, i < crossed_hot, 1, 10.0, 40.0, False))
            r.decisions.append(Decision(i, False, i < crossed_quiet, 2, 20.0, 50.0, False))
        return r
    out = table([run("cache_load", 3, 3), run("netkv", 0, 2)], "h003/nic/down", 60)
    assert re.search(r"sent across the hot link\s+3 \(30%\)\s+0 \(0%\)\n", out), out
    assert re.search(r"same link, while quiet\s+3 \(30%\)\s+2 \(20%\)\n", out), out
    assert re.search(r"tiers \(host/leaf/pod/core\)\s+0/10/10/0\s+0/10/10/0\n", out), out
    assert out.rstrip().endswith("netkv 0% of its decisions while hot (20% while quiet)")
