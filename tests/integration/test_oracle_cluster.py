"""The same ingest and publish code against a real three-master Redis Cluster.

The fixture starts three ``redis-server --cluster-enabled yes`` on free loopback ports and
joins them with ``redis-cli --cluster create``. Agents' streams land on different masters
(one hash tag per shard); the map keys share the ``{map}`` tag, so the fenced publish scripts
run on one master.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import until
from netkv_oracle.service import OracleService
from netkv_oracle.testkit import KEYS, batch, nic, oracle_settings
from redis.asyncio.cluster import RedisCluster

from netkv.contracts.names import shard_of
from netkv.contracts.snapshot import decode_snapshot
from netkv.core.congestion import CongestionMap
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.localservers import MosquittoServer, RedisServer, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.timeout(90)]


CLUSTER_MAX_PORT = 65535 - 10000  # the cluster bus listens on port + 10000


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[RedisServer]]:
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is not installed (Debian package redis-tools)")
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(RedisServer(
            port=free_port(at_most=CLUSTER_MAX_PORT), workdir=tmp_path / f"node{i}",
            extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "2000"))) for i in range(3)]
        proc = await asyncio.create_subprocess_exec(
            cli, "--cluster", "create", *(f"{n.host}:{n.port}" for n in nodes),
            "--cluster-replicas", "0", "--cluster-yes",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode(errors="replace")[-800:]
        client = RedisCluster(host=nodes[0].host, port=nodes[0].port)

        async def cluster_ok() -> bool:
            info = await client.cluster_info()
            return bool(info.get("cluster_state") == "ok")

        try:
            await until(cluster_ok, 20, 0.2)
        finally:
            await client.aclose()
        yield nodes


async def test_oracle_runs_unchanged_on_a_three_master_cluster(
        cluster: list[RedisServer], mosquitto_server: MosquittoServer) -> None:
    topology: Topology = parse_topology({"fabric": {"nic_gbps": 8}, "fat_tree": {}})
    node = cluster[0]
    settings = oracle_settings(node.url, mosquitto_server.port, oracle_id="c1", cluster=True,
                               sample_interval_s=2.0)
    client = RedisCluster(host=node.host, port=node.port)
    try:
        await client.initialize()
        hosts = [h.name for h in topology.hosts]
        # The agents' streams spread over several masters.
        slots = {client.keyslot(KEYS.samples_stream(h)) for h in hosts}
        owners = {getattr(client.get_node_from_key(KEYS.samples_stream(h)), "name", None)
                  for h in hosts}
        assert len({shard_of(h) for h in hosts}) > 1 and len(slots) > 1
        assert len(owners) > 1, "test needs streams on more than one master"
        async with OracleService(settings, topology) as oracle:
            await until(lambda: oracle.leading, 10)
            for i, h in enumerate(hosts):
                await client.xadd(KEYS.samples_stream(h),
                                  {"b": batch(h, nic(h, tx=1e6 * (i + 1)))})
            ups = [topology.link_index[f"{h}/nic/up"] for h in hosts]
            await until(lambda: all(oracle.builder.map.util[u] > 0 for u in ups), 10)

            async def published() -> CongestionMap | None:
                data = await client.get(KEYS.map_snapshot)
                if not isinstance(data, bytes):
                    return None
                cmap = decode_snapshot(topology, data)
                return cmap if all(cmap.util[u] > 0 for u in ups) else None

            cmap = await until(published, 10)
            assert [cmap.util[u] for u in ups] == [1e6 * (i + 1) for i in range(len(hosts))]
            assert int(await client.get(KEYS.map_version)) == cmap.version  # type: ignore[arg-type]
            assert await client.get(KEYS.oracle_lock) == b"c1"
            pending = await client.xpending(KEYS.samples_stream(hosts[0]), KEYS.consumer_group)
            assert pending["pending"] == 0
    finally:
        await client.aclose()
