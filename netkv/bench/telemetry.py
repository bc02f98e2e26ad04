"""`netkv bench telemetry --agents N --out FILE.json`: agents -> Redis -> oracle -> MQTT.

Three measurements per run, all on real servers and sockets:

* **ingest_samples_per_s / ingest_samples_per_cpu_s**: the oracle's ingest path alone
  (:meth:`~netkv_oracle.ingest.Ingestor.read_shard`: XREADGROUP over N per-agent streams,
  strict decode, identity check, map update, XACK) in this one process (one core; Redis runs
  in its own process), draining streams pre-filled with batches in the agents' wire format
  (one NIC sample + one RTT sample per pinglist peer, at most 64, so 16 samples per batch at
  16 agents and 65 from 65 agents up). Samples applied per wall-clock second, and per
  CPU-second of this process (on a shared machine the wall-clock figure includes time the
  process was not scheduled). Each of ``--rounds`` rounds drains a fresh pre-fill into a fresh
  map; the table shows the mean and 95% CI over rounds, the JSON every round.
  ``--ingest-only`` measures only this (no live mesh).
* **freshness_p50_s / p99_s**: N real agents (one measured agent in its own process plus
  N-1 peers in worker processes; probe, counter and publish intervals 0.1 s) publish to a
  real redis-server, and the real oracle service publishes map versions to a real mosquitto.
  The benchmark makes a change on the wire (a 1.5 s burst of TCP traffic over ``lo``, the
  measured agent's fabric NIC) and times from the burst's start to the arrival of the first
  MQTT map announcement whose snapshot (read from Redis) shows the measured host's NIC
  loaded. A burst no announcement showed before the next began counts as "missed" and
  enters the percentiles as one burst cycle (a lower bound).
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
import math
import multiprocessing
import os
import socket
import threading
import time
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
from netkv.contracts.names import MqttTopics, RedisKeys
from netkv.contracts.samples import NicSample, RttSample, Sample
from netkv.contracts.snapshot import SnapshotError, snapshot_links
from netkv.contracts.wire import Batch, encode_batch
from netkv.core.congestion import MapParams
from netkv.core.topology import Topology
from netkv.localservers import MosquittoServer, RedisServer
from netkv.sim.stats import ci95

KEYS = RedisKeys()
BURST_BYTES_S_MIN = 100e6  # a burst must load lo by at least this much to count as seen
BURST_S, QUIET_S = 1.5, 1.5
BURST_CYCLE_S = BURST_S + QUIET_S


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
    parser.add_argument("--rounds", type=int, default=3,
                        help="ingest measurements per N (mean and 95%% CI over rounds)")
    parser.add_argument("--ingest-only", action="store_true",
                        help="measure the oracle's ingest only (no live mesh: no freshness, "
                             "no agent CPU)")


# -- ingest -------------------------------------------------------------------------------
def _batch(topology: Topology, host: int, seq: int, ts: float) -> bytes:
    name = topology.hosts[host].name
    n = topology.n_hosts
    samples: list[Sample] = [NicSample(
        reporter=name, nic="lo", ts=ts, window_s=0.1, tx_bytes_s=1e6 + seq,
        rx_bytes_s=1e6, tx_packets_s=1e3, rx_packets_s=1e3, drops_s=0.0, errors_s=0.0,
        capacity_bps=0.0, oper_up=True)]
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
        load = os.getloadavg()[0]
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
    return {"samples": applied, "rejected": rejected, "batches": float(batches),
            "samples_per_batch": float(per_batch), "wall_s": wall, "cpu_s": cpu,
            "ingest_samples_per_s": applied / wall, "ingest_samples_per_cpu_s": applied / cpu,
            "load_average_1m": load}


async def measure_ingest_rounds(topology: Topology, redis_url: str, total_samples: int,
                                rounds: int) -> dict[str, Any]:
    """:func:`measure_ingest` ``rounds`` times: every round, and the mean and 95% CI of the
    two rates over rounds."""
    runs = [await measure_ingest(topology, redis_url, total_samples) for _ in range(rounds)]
    out: dict[str, Any] = {"rounds": runs}
    for key in ("ingest_samples_per_s", "ingest_samples_per_cpu_s"):
        interval = ci95([r[key] for r in runs])
        out[key] = interval.mean
        out[f"{key}_ci95"] = interval.half
    out["samples_per_batch"] = runs[0]["samples_per_batch"]
    out["load_average_1m"] = [r["load_average_1m"] for r in runs]
    return out


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
                            host: str, bursts: int) -> tuple[list[float], int]:
    """Seconds from each burst's start to the first announced map showing it, and how many
    bursts no announcement showed before the next burst began (missed)."""
    link = f"{host}/nic/up"
    redis = Redis.from_url(redis_url)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_burst_main, args=(BURST_S, QUIET_S, bursts, child), daemon=True)
    results: list[float] = []
    baseline: list[float] = []
    missed = 0
    pending: float | None = None
    started = False
    done_at: float | None = None
    try:
        async with aiomqtt.Client("127.0.0.1", mqtt_port) as client:
            await client.subscribe(MqttTopics().map_version, qos=1)
            await asyncio.sleep(1.0)  # baseline utilisation before the first burst
            proc.start()
            child.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(bursts * 2.5 + 15):
                    async for message in client.messages:
                        received = time.time()
                        while done_at is None and parent.poll():
                            try:
                                start = parent.recv()
                            except EOFError:
                                start = None
                            if start is None:
                                done_at = received
                            else:
                                started = True
                                if pending is not None:
                                    missed += 1
                                pending = start
                        if done_at is not None and (pending is None
                                                    or received - done_at > 5.0):
                            missed += pending is not None
                            break
                        payload = message.payload
                        if not isinstance(payload, bytes):
                            continue
                        data = await redis.get(json.loads(payload)["snapshot_key"])
                        try:  # only the one link: a full decode would load this process
                            links = snapshot_links(data if isinstance(data, bytes) else b"")
                        except SnapshotError:
                            continue
                        at = links.name.index(link)
                        util = float(links.util_bytes_s[at])
                        updated = float(links.updated_ts[at])
                        if not started:
                            baseline.append(util)
                            continue
                        floor = float(np.median(baseline)) if baseline else 0.0
                        if pending is not None and updated >= pending \
                                and util > floor + BURST_BYTES_S_MIN:
                            results.append(received - pending)
                            pending = None
    finally:
        await redis.aclose()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    return results, missed


# -- one run ------------------------------------------------------------------------------
async def run_one(agents: int, seconds: float, ingest_samples: int,
                  peer_processes: int, *, rounds: int = 1, ingest_only: bool = False
                  ) -> dict[str, Any]:
    topology = layout_topology(agents, "fat-tree")
    async with contextlib.AsyncExitStack() as stack:
        redis = await stack.enter_async_context(RedisServer())
        ingest = await measure_ingest_rounds(topology, redis.url, ingest_samples, rounds)
        row: dict[str, Any] = {
            "agents": agents,
            "ingest_samples_per_s": ingest["ingest_samples_per_s"],
            "ingest_samples_per_s_ci95": ingest["ingest_samples_per_s_ci95"],
            "ingest_samples_per_cpu_s": ingest["ingest_samples_per_cpu_s"],
            "ingest_samples_per_cpu_s_ci95": ingest["ingest_samples_per_cpu_s_ci95"],
            "samples_per_batch": ingest["samples_per_batch"],
            "load_average_1m": ingest["load_average_1m"],
            "detail": {"ingest": ingest, "pid": os.getpid(), "cpus": os.cpu_count()},
        }
        if ingest_only:
            return row
        mqtt = await stack.enter_async_context(MosquittoServer())
        settings = OracleSettings(
            redis=RedisSettings(url=redis.url), mqtt=MqttSettings(port=mqtt.port),
            http_port=0, sample_interval_s=0.1, stale_intervals=5.0, publish_interval_s=0.05,
            republish_s=1.0, read_block_ms=20, discover_interval_s=0.5, tomography=False,
            leader_ttl_s=10.0)
        await stack.enter_async_context(OracleService(settings, topology))
        base = AgentSettings(probe_interval_leaf_s=0.1, probe_interval_pod_s=0.1,
                             probe_interval_core_s=0.1, counter_interval_s=0.1,
                             publish_interval_s=0.1, rtt_window_s=1.0)
        warmup = 3.0 + agents / 32  # the peers need a while to start and register
        bursts = max(int((seconds - 4) / BURST_CYCLE_S), 2)  # end before the agents stop
        cpu_task = asyncio.create_task(measure_agent_cpu(
            agents - 1, seconds, redis_url=redis.url, warmup_s=warmup,
            peer_processes=peer_processes, base=base))
        await asyncio.sleep(warmup + 2.0)  # peers registered, the measured agent publishing
        fresh, missed = await measure_freshness(topology, redis.url, mqtt.port,
                                                topology.hosts[0].name, bursts)
        cpu = await cpu_task
    # A missed burst was not reflected before the next one began: count it as one burst
    # cycle (a lower bound on its freshness), never drop it.
    values = fresh + [BURST_CYCLE_S] * missed
    row.update({
        "freshness_p50_s": float(np.percentile(values, 50)) if values else float("nan"),
        "freshness_p99_s": float(np.percentile(values, 99)) if values else float("nan"),
        "agent_cpu_fraction": cpu["cpu_fraction"],
        "probe_bytes_per_s": cpu["probe_bytes_per_s"],
    })
    row["detail"].update({"freshness_samples_s": fresh, "bursts_missed": missed,
                          "agent": cpu, "probe_interval_s": 0.1})
    return row


def _interval(mean: float, half: float) -> str:
    return f"{mean:,.0f} +- {half:,.0f}" if math.isfinite(half) else f"{mean:,.0f}"


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    rows = [asyncio.run(run_one(n, args.seconds, args.ingest_samples, args.peer_processes,
                                rounds=args.rounds, ingest_only=args.ingest_only))
            for n in args.agents]
    print(f"oracle ingest, one process (mean +- 95% CI over {args.rounds} round(s) of "
          f"{args.ingest_samples:,} samples; load average shown per round)")
    print(f"{'agents':>6} {'samples/batch':>13} {'ingest samples/s (wall)':>26} "
          f"{'per CPU-s':>22}  load 1m")
    for r in rows:
        print(f"{r['agents']:>6} {r['samples_per_batch']:>13.0f} "
              f"{_interval(r['ingest_samples_per_s'], r['ingest_samples_per_s_ci95']):>26} "
              f"{_interval(r['ingest_samples_per_cpu_s'], r['ingest_samples_per_cpu_s_ci95']):>22}"
              f"  {' '.join(f'{x:.2f}' for x in r['load_average_1m'])}")
    if not args.ingest_only:
        print(f"\n{'agents':>6} {'fresh p50 s':>11} {'fresh p99 s':>11} {'missed':>6} "
              f"{'agent cpu':>9} {'probe B/s':>10}")
        for r in rows:
            print(f"{r['agents']:>6} {r['freshness_p50_s']:>11.3f} "
                  f"{r['freshness_p99_s']:>11.3f} {r['detail']['bursts_missed']:>6} "
                  f"{100 * r['agent_cpu_fraction']:>8.2f}% {r['probe_bytes_per_s']:>10.0f}")
    if args.out:
        out = rows[0] if len(rows) == 1 else rows
        Path(args.out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0
