"""The compose testbed's engine hosts and workload, without Docker: two engine hosts on
loopback addresses, the real scheduler (with the scaled model preset), real Redis and
Mosquitto; the workload replays requests through ``POST /v1/generate`` and every request's KV
bytes cross a TCP connection to the decode host the scheduler chose."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from netkv.core.topology_file import load_topology
from netkv.errors import InputError
from netkv.localservers import MosquittoServer, RedisServer, free_port
from netkv.testbed.enginehost import EngineHostSettings, GenerateBody, kv_endpoints, serve
from netkv.testbed.runner import ReplaySpec
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


async def _wait_http(url: str, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        while loop.time() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


@pytest.mark.timeout(120)
async def test_workload_through_engine_hosts_and_the_real_scheduler(
        redis_server: RedisServer, mosquitto_server: MosquittoServer, tmp_path: Path) -> None:
    topo_path = tmp_path / "topology.yaml"
    topo_path.write_text(yaml.safe_dump(TOPOLOGY))
    topology = load_topology(topo_path)
    port = free_port()
    config = tmp_path / "netkv.yaml"
    config.write_text(yaml.safe_dump({
        "redis": {"url": redis_server.url},
        "mqtt": {"host": "127.0.0.1", "port": mosquitto_server.port},
        "topology": str(topo_path),
        "scheduler": {"host": "127.0.0.1", "port": port, "kv_bytes_per_token": 33}}))
    log = (tmp_path / "scheduler.log").open("wb")
    sched = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netkv.cli", "scheduler", "--config",
        str(config), stdout=log, stderr=log)
    stop = asyncio.Event()
    hosts = []
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_http(url + "/healthz")
        http_ports = {"a": free_port("127.0.0.2"), "b": free_port("127.0.0.3")}
        kv_port = free_port()
        for name, address in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            settings = EngineHostSettings(host=name, scheduler_url=url, bind=address,
                                          http_port=http_ports[name], kv_port=kv_port,
                                          bytes_per_token=33.0)
            hosts.append(asyncio.create_task(serve(settings, topology, stop)))
        for name, address in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            await _wait_http(f"http://{address}:{http_ports[name]}/healthz")
        requests = synthetic_requests(ReplaySpec(count=12, speedup=20.0))
        urls = {"a": f"http://127.0.0.2:{http_ports['a']}",
                "b": f"http://127.0.0.3:{http_ports['b']}"}
        out = await replay(topology, "http://{host}:9000", requests, ["cache_load", "netkv"],
                           drain_s=0.5, host_urls=urls)
        assert set(out) == {"cache_load", "netkv"}
        for policy, result in out.items():
            s = result.summary()
            assert s["completed"] == len(requests), (policy, [o.error for o in result.outcomes])
            for o in result.outcomes:
                assert o.decode in {"a-d", "b-d"}
                assert o.kv_bytes == o.prompt_tokens * 33
                assert o.first_token_s >= o.transfer_end_s >= o.transfer_start_s > 0
    finally:
        stop.set()
        if hosts:
            await asyncio.wait(hosts, timeout=10)
        sched.terminate()
        await asyncio.wait_for(sched.wait(), 10)
        log.close()
    assert kv_endpoints(topology, 9100)["b-d"].address == "127.0.0.3"
    with pytest.raises(InputError, match="prompt_tokens"):
        GenerateBody("x", "a-p", prompt_tokens=0)
