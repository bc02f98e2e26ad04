"""The compose testbed's engine hosts and workload, without Docker: two engine hosts on
loopback addresses (``netkv engine`` instances for each host's prefill and decode), real Redis
and Mosquitto for the proxy's map feed; the workload replays requests through ``netkv proxy``
and every request's KV bytes are pulled by the chosen decode host from the prefill host."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import yaml

from netkv.adapters.topology_file import load_topology
from netkv.config import MqttSettings, RedisSettings
from netkv.errors import InputError
from netkv.localservers import MosquittoServer, RedisServer, wait_for_port
from netkv.testbed.enginehost import EngineHostSettings, engine_urls, serve
from netkv.testbed.runner import MapEndpoints, ReplaySpec
from netkv.testbed.workload import replay, synthetic_requests

pytestmark = pytest.mark.integration

TOPOLOGY = {
    "fabric": {"nic_gbps": 0.04, "host_fabric_gbps": 0.36},
    "hosts": [{"name": "a", "leaf": "l1", "pod": "p1", "address": "127.0.0.2"},
              {"name": "b", "leaf": "l2", "pod": "p1", "address": "127.0.0.3"}],
    "instances": [{"name": "a-p", "role": "prefill", "host": "a"},
                  {"name": "a-d", "role": "decode", "host": "a"},
                  {"name": "b-p", "role": "prefill", "host": "b"},
                  {"name": "b-d", "role": "decode", "host": "b"}],
}


def two_free_ports(address: str) -> int:
    """A port p such that p and p + 1 are free on ``address`` (bounded tries)."""
    for _ in range(50):
        with socket.socket() as s1:
            s1.bind((address, 0))
            port: int = s1.getsockname()[1]
            if port >= 65000:
                continue
            with socket.socket() as s2:
                try:
                    s2.bind((address, port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError(f"no two consecutive free ports on {address}")


@pytest.mark.timeout(120)
async def test_workload_through_the_proxy_and_engine_hosts(
        redis_server: RedisServer, mosquitto_server: MosquittoServer, tmp_path: Path) -> None:
    topo_path = tmp_path / "topology.yaml"
    topo_path.write_text(yaml.safe_dump(TOPOLOGY))
    topology = load_topology(topo_path)
    stop = asyncio.Event()
    hosts = []
    try:
        urls = {}
        for name, address in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            http_port, kv_port = two_free_ports(address), two_free_ports(address)
            settings = EngineHostSettings(host=name, bind=address, http_port=http_port,
                                          kv_port=kv_port, bytes_per_token=33.0)
            hosts.append(asyncio.create_task(serve(settings, topology, stop)))
            urls[name] = f"http://{address}:{http_port}"
        for address, url in (("127.0.0.2", urls["a"]), ("127.0.0.3", urls["b"])):
            port = int(url.rsplit(":", 1)[1])  # each host's prefill (port) and decode (+1)
            for p in (port, port + 1):
                await wait_for_port(address, p, timeout_s=15.0)
        b_port = int(urls["b"].rsplit(":", 1)[1])
        assert engine_urls(topology, urls)["b-d"] == f"http://127.0.0.3:{b_port + 1}"
        requests = synthetic_requests(ReplaySpec(count=12, speedup=20.0))
        endpoints = MapEndpoints(RedisSettings(url=redis_server.url),
                                 MqttSettings(port=mosquitto_server.port))
        out = await replay(topology, "unused", requests, ["cache_load", "netkv"],
                           endpoints=endpoints, drain_s=0.5, host_urls=urls)
        assert set(out) == {"cache_load", "netkv"}
        for policy, result in out.items():
            s = result.summary()
            assert s["completed"] == len(requests), (policy, [o.error for o in result.outcomes])
            for o in result.outcomes:
                assert o.prefill in {"a-p", "b-p"} and o.decode in {"a-d", "b-d"}
                assert 0 < o.kv_bytes <= o.prompt_tokens * 33
                assert o.first_token_s >= o.transfer_end_s >= o.transfer_start_s > 0
        # The first request replayed is the first the engine hosts ever see: its KV is
        # nowhere yet, so all of it moves. (Later policies' first requests may find blocks
        # the previous policy left in a decoder's cache: the hosts are not reset between.)
        first = out[next(iter(out))].outcomes[0]
        assert first.kv_bytes == first.prompt_tokens * 33
    finally:
        stop.set()
        if hosts:
            await asyncio.wait(hosts, timeout=10)
    with pytest.raises(InputError, match="http-port"):
        EngineHostSettings(host="a", http_port=0)
