"""`netkv bench telemetry --agents N --out FILE.json`: agents -> Redis -> oracle -> MQTT.

Three measurements per run, all on real servers and sockets:

* **ingest_samples_per_s**: the oracle's ingest path alone (XREADGROUP over N per-agent
  streams, strict decode, identity check, map update, XACK) on one core, draining streams
  pre-filled with batches in the agents' wire format (64 RTT samples + 1 NIC sample each,
  what an agent with a 64-peer pinglist publishes per window). Also reported per CPU-second.
* **freshness_p50_s / p99_s**: N real agents (one measured agent in its own process plus
  N-1 peers in worker processes; probe, counter and publish intervals 0.1 s) publish to a
  real redis-server, and the real oracle service publishes map versions to a real mosquitto.
  The benchmark makes a change on the wire (a burst of TCP traffic over ``lo``, the measured
  agent's fabric NIC) and times from the burst's start to the arrival of the first MQTT map
  announcement whose snapshot (read from Redis) shows the measured host's NIC loaded.
* **agent_cpu_fraction / probe_bytes_per_s**: CPU time of the measured agent over wall time
  (one core = 1.0) and the bytes it put on the wire for probing (requests and answers), from
  :func:`netkv_agent.footprint.measure_agent_cpu` in the same run.

The machine is shared, so absolute figures are noisy; compare runs side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
from netkv_agent.footprint import layout_topology, measure_agent_cpu
from netkv_agent.settings import AgentSettings
from netkv_oracle.builder import MapBuilder
from netkv_oracle.identity import Ownership
from netkv_oracle.ingest import Ingestor
from netkv_oracle.metrics import OracleMetrics
from netkv_oracle.service import OracleService
from netkv_oracle.settings import OracleSettings
from redis.asyncio import Redis

from netkv.adapters.redis_client import connect_redis
from netkv.config import MqttSettings, RedisSettings
from netkv.core.congestion import CongestionMap, MapParams, SnapshotError
from netkv.core.topology import Topology
from netkv.localservers import MosquittoServer, RedisServer
from netkv.telemetry.names import MqttTopics, RedisKeys
from netkv.telemetry.samples import NicSample, RttSample, Sample
from netkv.telemetry.wire import Batch, encode_batch

KEYS = RedisKeys()
BURST_BYTES_S_MIN = 100e6  # a burst must load lo by at least this much to count as seen


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agents", type=int, nargs="+", default=[16],
                        help="number of agents (one run per value), e.g. 16 64 256")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--seconds", type=float, default=12.0,
                        help="how long the live mesh runs per N (bursts fill it)")
    parser.add_argument("--ingest-samples", type=int, default=200_000,
                        help="samples pre-filled for the ingest measurement")
    parser.add_argument("--peer-processes", type=int, default=2,
                        help="worker processes that run the peer agents")


# -- ingest -------------------------------------------------------------------------------
def _batch(topology: Topology, host: int, seq: int, ts: float) -> bytes:
    name = topology.hosts[host].name
    n = topology.n_hosts
    samples: list[Sample] = [NicSample(
        reporter=name, nic="lo", ts=ts, window_s=0.1, tx_bytes_s=1e6 + seq,
        rx_bytes_s=1e6, tx_packets_s=1e3, rx_packets_s=1e3, drops_s=0.0, errors_s=0.0,
        speed_bytes_s=0.0)]
    for k in range(1, min(64, n - 1) + 1):
        peer = topology.hosts[(host + k) % n].name
        samples.append(RttSample(reporter=name, peer=peer, ts=ts, window_s=0.1, sent=1,
                                 lost=0, srtt_s=1e-4, p50_s=1e-4, p99_s=2e-4, min_s=9e-5))
    return encode_batch(Batch(name, seq, ts, tuple(samples)))


async def measure_ingest(topology: Topology, redis_url: str, total_samples: int
                         ) -> dict[str, float]:
    """Drain pre-filled streams through the oracle's ingest path; samples per second."""
    redis = connect_redis(RedisSettings(url=redis_url, prefix="bench:"))
    keys = RedisKeys("bench:")
    per_batch = 1 + min(64, topology.n_hosts - 1)
    batches = max(total_samples // per_batch, topology.n_hosts)
    now = time.time()
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for b in range(batches):
                host = b % topology.n_hosts
                pipe.xadd(keys.samples_stream(topology.hosts[host].name),
                          {"batch": _batch(topology, host, b, now)})
                if b % 500 == 499:
                    await pipe.execute()
            await pipe.execute()
        builder = MapBuilder(topology, MapParams(fresh_s=60, stale_s=120))
        metrics = OracleMetrics()
        ingestor = Ingestor(redis, keys, "bench", builder, ownership=Ownership(topology),
                            metrics=metrics, read_count=256, block_ms=1)
        await ingestor.discover()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        handled = 0
        while handled < batches:
            got = 0
            for shard in range(keys.shards):
                got += await ingestor.read_shard(shard)
            handled += got
            if not got:
                break
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        applied = sum(v for v in _counter(metrics, "netkv_samples_ingested_total"))
        rejected = sum(v for v in _counter(metrics, "netkv_samples_rejected_total"))
        await redis.flushdb()
    finally:
        await redis.aclose()
    return {"samples": applied, "rejected": rejected, "wall_s": wall, "cpu_s": cpu,
            "ingest_samples_per_s": applied / wall, "ingest_samples_per_cpu_s": applied / cpu}


def _counter(metrics: Any, name: str) -> list[float]:
    out = []
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                out.append(float(sample.value))
    return out


# -- a change on the wire -----------------------------------------------------------------
def _burst_main(seconds: float, gap_s: float, count: int, conn: Connection) -> None:
    """Child process: ``count`` TCP bursts over loopback, reporting each start time."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def sink() -> None:
        peer, _ = server.accept()
        with peer:
            while peer.recv(1 << 20):
                pass

    threading.Thread(target=sink, daemon=True).start()
    chunk = b"\x00" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as client:
        for _ in range(count):
            start = time.time()
            conn.send(start)
            while time.time() - start < seconds:
                client.sendall(chunk)
            time.sleep(gap_s)
    conn.send(None)
    conn.close()


async def measure_freshness(topology: Topology, redis_url: str, mqtt_port: int,
                            host: str, bursts: int) -> list[float]:
    """Seconds from each burst's start to the first announced map showing it."""
    up = topology.link_index[f"{host}/nic/up"]
    redis = Redis.from_url(redis_url)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_burst_main, args=(0.4, 1.2, bursts, child), daemon=True)
    starts: list[float] = []
    results: list[float] = []
    baseline: list[float] = []
    try:
        async with aiomqtt.Client("127.0.0.1", mqtt_port) as client:
            await client.subscribe(MqttTopics().map_version, qos=1)
            await asyncio.sleep(1.0)  # baseline utilisation before the first burst
            proc.start()
            child.close()
            pending: float | None = None
            done = False
            async with asyncio.timeout(bursts * 3 + 20):
                async for message in client.messages:
                    received = time.time()
                    while not done and parent.poll():
                        try:
                            start = parent.recv()
                        except EOFError:
                            start = None
                        if start is None:
                            done = True
                        else:
                            starts.append(start)
                            pending = start
                    if done and pending is None:
                        break
                    payload = message.payload
                    if not isinstance(payload, bytes):
                        continue
                    data = await redis.get(json.loads(payload)["snapshot_key"])
                    try:
                        cmap = CongestionMap.from_snapshot(
                            topology, data if isinstance(data, bytes) else b"")
                    except SnapshotError:
                        continue
                    util = float(cmap.util[up])
                    if pending is None:
                        baseline.append(util)
                        continue
                    floor = float(np.median(baseline)) if baseline else 0.0
                    if cmap.updated_ts[up] >= pending and util > floor + BURST_BYTES_S_MIN:
                        results.append(received - pending)
                        pending = None
                        if done:
                            break
    finally:
        await redis.aclose()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    return results


# -- one run ------------------------------------------------------------------------------
async def run_one(agents: int, seconds: float, ingest_samples: int,
                  peer_processes: int) -> dict[str, Any]:
    topology = layout_topology(agents, "fat-tree")
    async with contextlib.AsyncExitStack() as stack:
        redis = await stack.enter_async_context(RedisServer())
        mqtt = await stack.enter_async_context(MosquittoServer())
        ingest = await measure_ingest(topology, redis.url, ingest_samples)
        settings = OracleSettings(
            redis=RedisSettings(url=redis.url), mqtt=MqttSettings(port=mqtt.port),
            http_port=0, sample_interval_s=0.1, stale_intervals=5.0, publish_interval_s=0.02,
            republish_s=1.0, read_block_ms=20, discover_interval_s=0.5, tomography=False)
        await stack.enter_async_context(OracleService(settings, topology))
        base = AgentSettings(probe_interval_leaf_s=0.1, probe_interval_pod_s=0.1,
                             probe_interval_core_s=0.1, counter_interval_s=0.1,
                             publish_interval_s=0.1, rtt_window_s=1.0)
        warmup = 3.0
        bursts = max(int((seconds - 2) / 1.6), 3)
        cpu_task = asyncio.create_task(measure_agent_cpu(
            agents - 1, seconds, redis_url=redis.url, warmup_s=warmup,
            peer_processes=peer_processes, base=replace(base)))
        await asyncio.sleep(warmup + 2.0)  # peers registered, the measured agent publishing
        fresh = await measure_freshness(topology, redis.url, mqtt.port,
                                        topology.hosts[0].name, bursts)
        cpu = await cpu_task
    p50 = float(np.percentile(fresh, 50)) if fresh else float("nan")
    p99 = float(np.percentile(fresh, 99)) if fresh else float("nan")
    return {
        "agents": agents,
        "ingest_samples_per_s": ingest["ingest_samples_per_s"],
        "freshness_p50_s": p50,
        "freshness_p99_s": p99,
        "agent_cpu_fraction": cpu["cpu_fraction"],
        "probe_bytes_per_s": cpu["probe_bytes_per_s"],
        "detail": {"ingest": ingest, "freshness_samples_s": fresh, "agent": cpu,
                   "probe_interval_s": 0.1, "pid": os.getpid()},
    }


def run(args: argparse.Namespace) -> int:
    rows = [asyncio.run(run_one(n, args.seconds, args.ingest_samples, args.peer_processes))
            for n in args.agents]
    print(f"{'agents':>6} {'ingest samples/s':>16} {'fresh p50 s':>11} {'fresh p99 s':>11} "
          f"{'agent cpu':>9} {'probe B/s':>10}")
    for r in rows:
        print(f"{r['agents']:>6} {r['ingest_samples_per_s']:>16.0f} "
              f"{r['freshness_p50_s']:>11.3f} {r['freshness_p99_s']:>11.3f} "
              f"{100 * r['agent_cpu_fraction']:>8.2f}% {r['probe_bytes_per_s']:>10.0f}")
    if args.out:
        out = rows[0] if len(rows) == 1 else rows
        Path(args.out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0
