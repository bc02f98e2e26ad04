"""Fixtures that start real servers on free loopback ports and tear them down."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.eventloop import loop_factory
from netkv.localservers import MosquittoServer, RedisServer
from netkv.workload.synth import synthesise, write_trace

SMALL_FAT_TREE = {
    "fabric": {"nic_gbps": 400, "leaf_oversubscription": 1, "pod_oversubscription": 2},
    "fat_tree": {"pods": 2, "leaves_per_pod": 2, "hosts_per_leaf": 2, "gpus_per_host": 8,
                 "instance_gpus": 8, "role_pattern": "PD"},
}


@pytest.fixture
def small_topology() -> Topology:
    """8 hosts; prefill and decode hosts alternate (every transfer crosses the network)."""
    return parse_topology(SMALL_FAT_TREE, "test topology")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--event-loop", choices=("asyncio", "uvloop"), default=None,
                     help="run the async tests on this event loop (default: pytest-asyncio's, "
                     "asyncio); e.g. the in-process proxy tests once on each")


class _EventLoop:
    """The ``--event-loop`` choice as pytest-asyncio's loop-factory hook."""

    def __init__(self, name: str) -> None:
        self.name = name

    def pytest_asyncio_loop_factories(self, config: pytest.Config, item: pytest.Item
                                      ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        return {self.name: loop_factory("uvloop" if self.name == "uvloop" else "asyncio")}


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("--event-loop")
    if name:
        config.pluginmanager.register(_EventLoop(name), "netkv-event-loop")


TIERS = ("unit", "integration", "netns", "testbed")
# A whole-testbed test is also a namespace (or compose) test; no other tier mixes.
ALSO_ALLOWED = {"testbed": {"netns"}}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The folder is the tier: every test in ``tests/<tier>/`` gets the ``<tier>`` marker
    (so ``-m unit`` selects exactly ``tests/unit``), and a test marked for another tier
    than its folder's stops the run, naming it."""
    root = Path(__file__).parent
    wrong: list[str] = []
    for item in items:
        parts = item.path.relative_to(root).parts if item.path.is_relative_to(root) else ()
        folder = parts[0] if len(parts) > 1 else ""
        if folder not in TIERS:
            continue
        marked = {m.name for m in item.iter_markers() if m.name in TIERS}
        others = marked - {folder} - ALSO_ALLOWED.get(folder, set())
        if others:
            wrong.append(f"{item.nodeid}: marked {', '.join(sorted(others))} "
                         f"but lives in tests/{folder}/")
        if folder not in marked:
            item.add_marker(folder)
    if wrong:
        raise pytest.UsageError("tests in the wrong tier folder:\n  " + "\n  ".join(wrong))


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server on a free loopback port (function scope: tests may restart it)."""
    async with RedisServer(workdir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def mosquitto_server(tmp_path: Path) -> AsyncIterator[MosquittoServer]:
    """A real mosquitto broker on a free loopback port."""
    async with MosquittoServer(workdir=tmp_path / "mosquitto") as server:
        yield server


@pytest.fixture(scope="session")
def trace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workload the replay tests use: the Mooncake-format trace named by ``TRACE`` or
    ``NETKV_TRACE`` when set (a real copy of the conversation trace, say), otherwise the
    embedded seeded workload (``netkv trace synth``) written to a temporary file. Nothing is
    read from outside the repository unless a path is given."""
    given = os.environ.get("TRACE") or os.environ.get("NETKV_TRACE")
    if given:
        path = Path(given)
        if not path.is_file():
            pytest.fail(f"TRACE/NETKV_TRACE names {given}, which is not a readable file")
        return path
    path = tmp_path_factory.mktemp("trace") / "synthetic.jsonl"
    write_trace(synthesise(2000, seed=0), path)
    return path


@pytest.fixture
def shared_trace(trace_path: Path) -> Path:
    """Old name of :func:`trace_path`, kept for tests written against it."""
    return trace_path


@pytest.fixture(autouse=True)
def _collect_garbage_per_test() -> Iterator[None]:
    """Collect after each test so a leaked socket or file fails the test that leaked it,
    not whichever later test happens to trigger the garbage collector."""
    yield
    gc.collect()


@dataclass(frozen=True)
class VethPair:
    """Two namespaces this test made, joined by a veth pair with a /30 between them."""

    ns_a: str
    ns_b: str
    if_a: str
    if_b: str
    addr_a: str
    addr_b: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def make_veth_pair() -> Iterator[Callable[[str, str], VethPair]]:
    """Factory: ``make_veth_pair(label, "198.18.7")`` makes namespaces ``nkv-<label>-a/b-<tag>``
    with addresses ``<prefix>.1`` and ``<prefix>.2`` (RFC 2544 range); all are deleted after
    the test, also when it fails. Skips with the reason when not root or without iproute2."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs root and iproute2 (ip, tc) to create network namespaces")
    made: list[str] = []

    def make(label: str, prefix: str) -> VethPair:
        tag = secrets.token_hex(3)
        pair = VethPair(f"nkv-{label}-a-{tag}", f"nkv-{label}-b-{tag}", f"{label[:2]}a{tag}",
                        f"{label[:2]}b{tag}", f"{prefix}.1", f"{prefix}.2")
        for ns in (pair.ns_a, pair.ns_b):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", pair.if_a, "netns", pair.ns_a, "type", "veth", "peer", "name",
            pair.if_b, "netns", pair.ns_b)
        for ns, ifname, addr in ((pair.ns_a, pair.if_a, pair.addr_a),
                                 (pair.ns_b, pair.if_b, pair.addr_b)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                            "net.ipv6.conf.all.disable_ipv6=1"], check=False, timeout=10)
        return pair

    try:
        yield make
    finally:
        for ns in made:
            with contextlib.suppress(subprocess.SubprocessError):
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True,
                               timeout=10)
