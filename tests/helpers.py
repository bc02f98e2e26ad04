"""Helpers shared by the tests of every tier (import as ``from helpers import ...``)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import os
import resource
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from netkv.tasks import stop_process


async def until(check: Callable[[], Any], timeout_s: float = 15.0, step_s: float = 0.05,
                what: str = "condition") -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy, and return that;
    fail after ``timeout_s`` (every test's polling loop is bounded by this one helper)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout_s:g} s")
        await asyncio.sleep(step_s)


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; returns the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.asynccontextmanager
async def scheduler_process(env: Mapping[str, str] | None = None, *args: str,
                            nofile: int | None = None, start_timeout_s: float = 60.0) \
        -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """A real ``netkv scheduler`` process on a free loopback port; yields (base URL, process).

    ``nofile`` sets the child's soft file limit (e.g. the common default of 1024).
    """
    def limit() -> None:
        if nofile is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("NETKV_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netkv.cli", "scheduler", "--port", "0", *args,
        env=child_env | dict(env or {}), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=limit)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(start_timeout_s):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    raise AssertionError("the scheduler exited before listening")
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("event") == "listening":
                        break
        yield event["urls"][0], proc
    finally:
        await stop_process(proc, 10.0)


def conversation_trace(path: Path, n: int = 160, seed: int = 3, span_s: float = 40.0) -> Path:
    """A small conversation-like Mooncake-format trace (a shared first block; some requests
    extend an earlier one), seeded. The simulator's golden figures (tests/unit/golden) are
    computed on it: changing it means regenerating them."""
    rng = np.random.default_rng(seed)
    next_id = 1
    lines: list[str] = []
    history: list[list[int]] = []
    for i in range(n):
        tokens = int(rng.integers(300, 24_000))
        blocks = math.ceil(tokens / 512)
        if history and rng.random() < 0.4:
            prev = history[int(rng.integers(len(history)))]
            keep = prev[: min(len(prev), blocks)]
        else:
            keep = [0]
        ids = list(keep)
        while len(ids) < blocks:
            ids.append(next_id)
            next_id += 1
        history.append(ids)
        ts = int(1000 * span_s * i / n)
        lines.append(json.dumps({"timestamp": ts, "input_length": tokens,
                                 "output_length": int(rng.integers(1, 400)), "hash_ids": ids}))
    path.write_text("\n".join(lines) + "\n")
    return path
