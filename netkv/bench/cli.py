"""`netkv bench NAME ...`: each benchmark is a module with ``configure`` and ``run``, imported
only when chosen."""

from __future__ import annotations

import argparse
import importlib
from typing import cast

from netkv.cli import Subcommand

BENCHMARKS: dict[str, tuple[str, str]] = {
    "decision": ("netkv.bench.decision", "in-process decision time per policy vs |D|"),
    "telemetry": ("netkv.bench.telemetry", "agents -> Redis -> oracle ingest and freshness"),
    "scheduler": ("netkv.bench.scheduler", "scheduler HTTP latency and throughput vs floor"),
    "select": ("netkv.bench.select_cost",
               "one scheduler decision in process: instructions and time, C modules on/off"),
    "proxy": ("netkv.bench.proxy", "P/D proxy added latency and rate vs a pass-through floor"),
    "soak": ("netkv.bench.soak", "the whole mesh under steady load: RSS and log volume"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    listing = "; ".join(f"{name}: {text}" for name, (_, text) in BENCHMARKS.items())
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help=listing)
    parser.add_argument("rest", nargs=argparse.REMAINDER,
                        help="the benchmark's own arguments (see netkv bench NAME --help)")


def run(args: argparse.Namespace) -> int:
    module = cast(Subcommand, importlib.import_module(BENCHMARKS[args.benchmark][0]))
    parser = argparse.ArgumentParser(prog=f"netkv bench {args.benchmark}",
                                     description=BENCHMARKS[args.benchmark][1])
    module.configure(parser)
    bench_args = parser.parse_args(args.rest)
    bench_args.environ = args.environ
    return module.run(bench_args)
