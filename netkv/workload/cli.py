"""`netkv trace synth|stats`: write the embedded workload, or print a trace's statistics.

``netkv trace synth --out FILE [--requests N] [--seed S]`` writes a Mooncake-format trace
(:mod:`netkv.workload.synth`); ``netkv trace stats FILE`` prints the statistics the synthesiser
is checked on, beside the published figures, for that file or the synthetic default.
"""

from __future__ import annotations

import argparse
import json

from netkv.errors import InputError
from netkv.workload.synth import (
    DEFAULT_REQUESTS,
    DEFAULT_SEED,
    PUBLISHED,
    statistics,
    synthesise,
    write_trace,
)
from netkv.workload.trace import load_trace


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    synth = sub.add_parser("synth", help="write the seeded conversation-like workload")
    synth.add_argument("--out", required=True, help="where to write the JSONL trace")
    synth.add_argument("--requests", type=int, default=DEFAULT_REQUESTS,
                       help=f"number of requests (default {DEFAULT_REQUESTS})")
    synth.add_argument("--seed", type=int, default=DEFAULT_SEED,
                       help=f"random seed (default {DEFAULT_SEED})")
    stats = sub.add_parser("stats", help="print a trace's statistics beside the published ones")
    stats.add_argument("trace", nargs="?", help="trace file (default: the synthetic workload)")
    stats.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    if args.action == "synth":
        if args.requests < 1:
            raise InputError("--requests", f"must be >= 1, got {args.requests}")
        trace = synthesise(args.requests, args.seed)
        write_trace(trace, args.out)
        print(f"netkv trace: wrote {len(trace)} requests (seed {args.seed}) to {args.out}")
        return 0
    trace = load_trace(args.trace) if args.trace else synthesise()
    st = statistics(trace)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"{'statistic':<16} {trace.path[:40]:>40} {'published':>12}")
    for key, value in st.items():
        ref = PUBLISHED.get(key)
        print(f"{key:<16} {value:>40.3f} {'' if ref is None else f'{ref:.3f}':>12}")
    return 0


__all__ = ["configure", "run"]
