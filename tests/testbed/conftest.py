"""Fixtures for the namespace testbed: skip with a printed reason where namespaces, veths or
tbf are unavailable (not root, no iproute2, a kernel without sch_tbf)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.testbed.netns import Lab, list_namespaces

SMALL_FAT_TREE = {
    "fabric": {"nic_gbps": 400, "leaf_oversubscription": 1, "pod_oversubscription": 2},
    "fat_tree": {"pods": 2, "leaves_per_pod": 2, "hosts_per_leaf": 2, "gpus_per_host": 8,
                 "instance_gpus": 8, "role_pattern": "PD"},
}


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    probe = "nkvprobe-tbf"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True)
        done = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "tbf",
                               "rate", "1mbit", "burst", "16k", "limit", "32k"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return f"tbf qdisc unavailable: {done.stderr.strip()}"
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr!r}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


@pytest.fixture(scope="session")
def netns_available() -> None:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def small_topology() -> Topology:
    """8 hosts; prefill and decode hosts alternate (every transfer crosses the network)."""
    return parse_topology(SMALL_FAT_TREE, "test topology")


@pytest.fixture
def lab(netns_available: None) -> Iterator[Lab]:
    """A lab torn down after the test; the test fails if anything of it is left."""
    with Lab() as lab:
        yield lab
    left = [n for n in list_namespaces() if n.startswith(lab.prefix)]
    assert not left, f"namespaces left after teardown: {left}"
