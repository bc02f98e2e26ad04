"""Fixtures for the namespace testbed: skip with a printed reason where namespaces, veths or
tbf are unavailable (not root, no iproute2, a kernel without sch_tbf)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from netkv.testbed.netns import Lab, list_namespaces


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
def lab(netns_available: None) -> Iterator[Lab]:
    """A lab torn down after the test; the test fails if anything of it is left."""
    with Lab() as lab:
        yield lab
    left = [n for n in list_namespaces() if n.startswith(lab.prefix)]
    assert not left, f"namespaces left after teardown: {left}"
