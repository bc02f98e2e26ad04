"""The compose testbed's actions: ``engine --host NAME`` (one GPU host's emulated engines as
a service), ``workload`` (the one-shot policy comparison against them) and ``bulk`` (a
background bulk sink and sender)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from netkv.config import read_config_file
from netkv.errors import InputError
from netkv.testbed.background import bulk
from netkv.testbed.cli_lab import bytes_per_token, policy_list, topology_of
from netkv.testbed.enginehost import EngineHostSettings, run_forever
from netkv.testbed.runner import MapEndpoints, ReplaySpec, format_table, write_summary
from netkv.testbed.workload import replay, requests_for


def engine(args: argparse.Namespace) -> int:
    if not args.host or not args.topology:
        raise InputError("--host", "engine needs --host and --topology")
    topology, _ = topology_of(args)
    topology.host_id(args.host)
    settings = EngineHostSettings(host=args.host, http_port=args.http_port,
                                  kv_port=args.kv_port,
                                  bytes_per_token=float(bytes_per_token(args.scale)))
    return run_forever(settings, topology)


def _address(value: str | None, flag: str) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(flag, f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def bulk_flows(args: argparse.Namespace) -> int:
    listen, to = _address(args.listen, "--listen"), _address(args.to, "--to")
    if listen is None and to is None:
        raise InputError("--listen", "bulk needs --listen and/or --to")
    if not 0 < args.seconds <= 86400 or not 1 <= args.flows <= 256:
        raise InputError("--seconds", "seconds in (0, 86400] and flows in 1..256")
    print(f"bulk: sink {listen}, {args.flows if to else 0} flows to {to} for {args.seconds:g}s",
          flush=True)
    sent = asyncio.run(bulk(listen, to, args.flows, args.seconds))
    print(f"bulk: sent {sent} bytes", flush=True)
    return 0


def workload(args: argparse.Namespace) -> int:
    if not args.topology:
        raise InputError("--topology", "workload needs the compose topology file")
    topology, _ = topology_of(args)
    trace_arg = args.trace or args.environ.get("NETKV_TRACE")
    spec = ReplaySpec(start=args.start, count=args.count, speedup=args.speedup)
    requests, source = requests_for(Path(trace_arg) if trace_arg else None, spec)
    policies = policy_list(args.policies)
    print(f"workload: {len(requests)} requests from {source}, policies {policies}",
          flush=True)
    shared = read_config_file(args.config) if args.config else {}
    results = asyncio.run(replay(topology, args.engine_url, requests, policies,
                                 endpoints=MapEndpoints.from_config(shared),
                                 bytes_per_token=float(bytes_per_token(args.scale))))
    print(format_table(results), flush=True)
    path = write_summary(Path(args.out), results, {
        "testbed": "compose", "requests": len(requests), "source": source,
        "scale": args.scale, "kv_bytes_per_token": bytes_per_token(args.scale)})
    print(f"wrote {path}", flush=True)
    failed = sum(r.summary()["errors"] for r in results.values())
    return 1 if failed == sum(len(r.outcomes) for r in results.values()) else 0
