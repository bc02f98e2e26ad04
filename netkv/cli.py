"""The `netkv` command. Subcommands live in their own modules and are imported only when used,
so `netkv agent` on a GPU host does not pay for matplotlib and `--help` stays fast.

Each subcommand module provides ``configure(parser)`` and ``run(args) -> int``. Bad input
(:class:`~netkv.errors.InputError`) ends the command with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from netkv import __version__
from netkv.errors import InputError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("netkv_agent.cli", "run the host agent: probe the network, publish samples"),
    "oracle": ("netkv_oracle.cli", "run the oracle: build the congestion map, serve costs"),
    "scheduler": ("netkv_scheduler.cli", "run the scheduler: HTTP decode selection"),
    "up": ("netkv.up", "run the whole mesh on this machine (redis, mosquitto, agents, ...)"),
    "sim": ("netkv.sim.cli", "trace-driven simulation of the scheduling policies"),
    "testbed": ("netkv.testbed.cli", "network-namespace testbed that moves real bytes"),
    "trace": ("netkv.workload.cli", "the embedded workload: synthesise a trace, print statistics"),
    "bench": ("netkv.bench.cli", "benchmarks: decision, telemetry, scheduler"),
    "engine": ("netkv.engine.cli", "an emulated engine that speaks vLLM's P/D protocol"),
    "proxy": ("netkv_proxy.cli", "the OpenAI-compatible P/D proxy that places decodes"),
}


class Subcommand(Protocol):
    def configure(self, parser: argparse.ArgumentParser) -> None: ...
    def run(self, args: argparse.Namespace) -> int: ...


def _load(name: str) -> Subcommand:
    return cast(Subcommand, importlib.import_module(COMMANDS[name][0]))


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netkv", description="Network-aware decode-instance selection for disaggregated "
        "LLM inference. Config comes from --config FILE plus NETKV_* environment variables.")
    parser.add_argument("--version", action="version", version=f"netkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _load(name).configure(p)
    return parser


def main(argv: Sequence[str] | None = None,
         environ: Callable[[], dict[str, str]] = lambda: dict(os.environ)) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.environ = environ()
    try:
        return _load(args.command).run(args)
    except InputError as exc:
        print(f"netkv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
