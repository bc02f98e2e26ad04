"""netkv.routing used in-process, the way the P/D proxy uses it (no HTTP, no scheduler)."""

from __future__ import annotations

from importlib import resources

import pytest

from netkv.adapters.topology_file import load_topology
from netkv.core.congestion import CongestionMap
from netkv.errors import InputError
from netkv.routing import InstanceReport, MapFeed, Selector, SelectorConfig, SelectRequest

pytestmark = pytest.mark.unit


def test_selector_decides_books_and_releases_in_process() -> None:
    topo = load_topology(str(resources.files("netkv") / "data" / "topology-demo.yaml"))
    now = 1000.0
    feed = MapFeed(topo, None, None, clock=lambda: now)
    cmap = CongestionMap(topo, clock=lambda: now)
    cmap.version, cmap.created_ts = 1, now
    assert feed.install(cmap)
    selector = Selector(SelectorConfig(bytes_per_token=327680.0), topo, feed,
                        clock=lambda: now)
    choice = selector.select(SelectRequest(request_id="r1", prefill="h000-p0",
                                           prompt_tokens=8000, block_hashes=(1, 2)))
    assert choice.decoder.name == "h000-d1" and choice.reserved and choice.view.version == 1
    assert selector.reservations.pending[choice.decision.index] == 1
    released = selector.release("r1")
    assert released is not None and released.name == "h000-d1"
    assert selector.release("r1") is None
    with pytest.raises(InputError) as bad:
        selector.select(SelectRequest(request_id="r2", prefill="h000-p0", prompt_tokens=1,
                                      policy="best"))
    assert bad.value.where == "body.policy"
    info = selector.register(InstanceReport(name="h000-d1", kv_use=0.5))
    assert selector.registry.load_of(info).kv_use == 0.5
