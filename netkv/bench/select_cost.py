"""`netkv bench select`: what one scheduler decision costs in process, C modules on and off.

The scheduler of ``netkv bench scheduler`` (a fat-tree with ``--decoders`` decode instances,
a measured congestion map, every select booked for 2 s) is built in a child process and fed
that bench's requests on a virtual clock at ``--rate`` selects per second, so the bookings,
the prefix index and the KV queues stand as they do under that bench's load. After
``--warmup`` selects the garbage collector is switched off and ``--selects`` more are made.
Each variant (``native``: the router's C modules where built; ``python``: the decision kernel
and the prefix loops off) reports:

* instructions per select, counted by ``valgrind --tool=cachegrind`` (deterministic; the
  difference between a run with and one without the measured selects), where valgrind is
  installed;
* the wall time per select in the same child without valgrind (this machine's noise
  included).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from netkv_scheduler.app import SELECTOR
from netkv_scheduler.settings import SchedulerSettings

from netkv.bench.scheduler import _requests, _scheduler_app
from netkv.http.bodies import decode
from netkv.routing import SelectRequest
from netkv.routing.fused import KERNEL_BUILT

VARIANTS = ("native", "python")
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoders", type=int, default=64, help="decode instances (|D|)")
    parser.add_argument("--warmup", type=int, default=11_000,
                        help="selects before the measured ones (the bookings reach steady "
                        "state after rate x 2 s)")
    parser.add_argument("--selects", type=int, default=2_000, help="measured selects")
    parser.add_argument("--rate", type=float, default=5_000.0,
                        help="selects per second of the virtual clock")
    parser.add_argument("--out", type=Path, help="write the JSON result here")


def _child(variant: str, decoders: int, warmup: int, selects: int, rate: float) -> None:
    """Build, warm up, measure; print the wall time per measured select as JSON."""
    settings = SchedulerSettings(port=1, policy="netkv", reservation_ttl_s=2.0,
                                 map_stale_s=3600.0, log_level="warning")
    tick = [0]
    start_ts = time.time()

    def clock() -> float:
        return start_ts + tick[0] / rate

    selector = _scheduler_app(settings, decoders, clock)[SELECTOR]
    selector.clock = selector.reservations.clock = selector.registry.clock = clock
    if variant == "python":
        for fused in selector.fused.values():
            fused.kernel = None
        selector.prefixes._c = None
    bodies = [decode(raw.split(b"\r\n\r\n", 1)[1], SelectRequest)
              for raw in _requests(warmup + selects, decoders, seed=2)]
    for k in range(warmup):
        tick[0] = k
        selector.select(bodies[k])
    gc.collect()
    gc.disable()
    began = time.perf_counter()
    for k in range(warmup, warmup + selects):
        tick[0] = k
        selector.select(bodies[k])
    elapsed = time.perf_counter() - began
    print(json.dumps({"wall_us": elapsed / max(selects, 1) * 1e6}))


def _command(variant: str, args: argparse.Namespace, selects: int) -> list[str]:
    return [sys.executable, "-m", "netkv.bench.select_cost", "--child", variant,
            str(args.decoders), str(args.warmup), str(selects), str(args.rate)]


def _instructions(variant: str, args: argparse.Namespace, selects: int,
                  valgrind: str) -> int:
    done = subprocess.run(
        [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         *_command(variant, args, selects)],
        capture_output=True, text=True, timeout=3600, check=False, env=args.environ)
    found = _REFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind ({variant}, {selects} selects) failed: "
                           f"{done.stderr.strip()[-500:]}")
    return int(found.group(1).replace(",", ""))


def _wall_us(variant: str, args: argparse.Namespace) -> float:
    done = subprocess.run(_command(variant, args, args.selects), capture_output=True,
                          text=True, timeout=600, check=True, env=args.environ)
    wall: float = json.loads(done.stdout.strip().splitlines()[-1])["wall_us"]
    return wall


def run(args: argparse.Namespace) -> int:
    if min(args.decoders, args.selects) < 1 or args.warmup < 0 or args.rate <= 0:
        print("netkv bench select: --decoders and --selects must be >= 1, --warmup >= 0, "
              "--rate > 0", file=sys.stderr)
        return 2
    valgrind = shutil.which("valgrind")
    result: dict[str, Any] = {"decoders": args.decoders, "warmup": args.warmup,
                              "selects": args.selects, "rate": args.rate,
                              "kernel_built": KERNEL_BUILT, "variants": {}}
    variants = VARIANTS if KERNEL_BUILT else VARIANTS[1:]
    for variant in variants:
        entry: dict[str, Any] = {"wall_us": round(_wall_us(variant, args), 2)}
        if valgrind is not None:
            base = _instructions(variant, args, 0, valgrind)
            full = _instructions(variant, args, args.selects, valgrind)
            entry["instructions"] = round((full - base) / args.selects)
        result["variants"][variant] = entry
    print(f"{'variant':<8} {'instructions/select':>20} {'wall µs/select':>15}")
    for variant, entry in result["variants"].items():
        count = entry.get("instructions")
        print(f"{variant:<8} {'n/a' if count is None else f'{count:,}':>20} "
              f"{entry['wall_us']:>15.1f}")
    native, python = (result["variants"].get(v, {}).get("instructions") for v in VARIANTS)
    if native and python:
        print(f"native / python: {native / python:.2f}x the instructions")
    print(f"(|D| = {args.decoders}, {args.warmup} selects of warm-up then {args.selects} "
          f"measured on a {args.rate:g}/s virtual clock, GC off while measured; "
          f"load average {os.getloadavg()[0]:.1f}"
          + ("" if valgrind else "; valgrind not installed: no instruction counts") + ")")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
           float(sys.argv[6]))
