"""The routers compared on the testbed, each started and stopped like any other process.

A router sits between the clients and the prefill/decode engines and picks both legs:

* ``netkv:<policy>``: ``netkv proxy`` with one of NetKV's policies (``netkv``, ``cache_load``,
  ...; a bare policy name means the same), in vLLM's NixlConnector pull mode, following the
  live congestion map;
* ``vllm-router:<policy>``: the Rust ``vllm-router`` (PyPI ``vllm-router``, the ``peers``
  extra) in ``--vllm-pd-disaggregation`` mode with ``--kv-connector nixl`` and one of its
  policies (``round_robin``, ``random``, ``cache_aware``, ``power_of_two``,
  ``consistent_hash``, ``sticky_least_loaded``);
* ``sglang-router:<policy>``: the SGLang router (PyPI ``sglang-router``) in
  ``--pd-disaggregation`` mode. It speaks SGLang's bootstrap flow only (the same body to
  prefill and decode at once, with ``bootstrap_host/port/room``), never vLLM's
  ``kv_transfer_params``; the testbed's engines speak both, so it drives them through
  bootstrap, each prefill's bootstrap port being its KV side channel.

What the peers send was recorded on loopback (``tests/integration/test_peer_routers.py``).
``kv_aware`` (vllm-router) needs ZMQ KV-cache events, and ``manual``/``bucket`` (SGLang)
need routing keys the replay does not have: those are refused with the reason.

Every router runs under the same :class:`Pinning` (``taskset`` to the same CPU, same
``nice``), is ready once its readiness URL answers 200 (bounded wait; a router that exits
first is an error quoting its log), and is stopped with TERM then KILL after a bounded wait.
Processes are started through a ``spawn`` callable: :meth:`Lab.spawn
<netkv.testbed.netns.Lab.spawn>` on the testbed (so the ledger and teardown know them) or
:func:`spawn_local` on loopback.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil
import structlog

from netkv.core.policies import policy_names
from netkv.errors import InputError
from netkv.localservers import ServerError, wait_http_ready
from netkv.testbed.netns import stop_pids

log = structlog.get_logger(__name__)

RouterKind = Literal["netkv", "vllm-router", "sglang-router"]
KINDS: tuple[RouterKind, ...] = ("netkv", "vllm-router", "sglang-router")
VLLM_ROUTER_POLICIES: tuple[str, ...] = ("round_robin", "random", "cache_aware", "power_of_two",
                        "consistent_hash", "sticky_least_loaded")
SGLANG_ROUTER_POLICIES: tuple[str, ...] = ("round_robin", "random", "cache_aware", "power_of_two")
NOT_APPLICABLE = {
    ("vllm-router", "kv_aware"): "needs ZMQ KV-cache events (--kv-event-source), which the "
                                 "emulated engines do not publish",
    ("sglang-router", "manual"): "routes by client-given routing keys the replay does not have",
    ("sglang-router", "bucket"): "a prefill-only policy",
}
EXECUTABLES = {"vllm-router": "vllm-router", "sglang-router": "sglang-router"}
READY_PATHS = {"netkv": "/health", "vllm-router": "/readiness", "sglang-router": "/health"}

Spawn = Callable[[list[str], Path], "subprocess.Popen[bytes]"]


class RouterError(RuntimeError):
    """A router could not be started (missing binary, exited, never ready)."""


def _netkv_policies() -> list[str]:
    return list(policy_names())


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """Which router, with which policy."""

    kind: RouterKind
    policy: str

    @property
    def label(self) -> str:
        return self.policy if self.kind == "netkv" else f"{self.kind}:{self.policy}"

    @property
    def mode(self) -> Literal["pull", "bootstrap"]:
        """The P/D flow the engines see from this router."""
        return "bootstrap" if self.kind == "sglang-router" else "pull"

    @classmethod
    def parse(cls, text: str, where: str = "--routers") -> RouterSpec:
        """``netkv``, ``cache_load`` (NetKV policies), ``netkv:POLICY``,
        ``vllm-router:POLICY``, ``sglang-router:POLICY`` (default policy round_robin)."""
        name, _, policy = text.strip().partition(":")
        if name in ("vllm-router", "sglang-router"):
            kind: RouterKind = name  # type: ignore[assignment]
            policy = policy or "round_robin"
            known = VLLM_ROUTER_POLICIES if kind == "vllm-router" else SGLANG_ROUTER_POLICIES
        elif name == "netkv" and policy:
            kind, known = "netkv", tuple(_netkv_policies())
        elif not policy:
            kind, policy, known = "netkv", name, tuple(_netkv_policies())
        else:
            raise InputError(where, f"unknown router {name!r} in {text!r}; known: "
                             f"{', '.join(KINDS)} (or a NetKV policy name)")
        reason = NOT_APPLICABLE.get((kind, policy))
        if reason is not None:
            raise InputError(where, f"{kind}:{policy} does not apply here: {reason}")
        if policy not in known:
            raise InputError(where, f"unknown {kind} policy {policy!r}; known: "
                             f"{', '.join(known)}")
        return cls(kind, policy)


def parse_routers(text: str) -> list[RouterSpec]:
    specs = [RouterSpec.parse(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise InputError("--routers", "name at least one router")
    labels = [s.label for s in specs]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise InputError("--routers", f"{dup} is named twice")
    return specs


@dataclass(frozen=True, slots=True)
class Worker:
    """One engine as a router sees it: its HTTP URL, its topology host and (for SGLang's
    bootstrap flow) the port where its KV side channel listens."""

    url: str
    host: str
    bootstrap_port: int | None = None


@dataclass(frozen=True, slots=True)
class Pinning:
    """The CPU share every router gets: ``taskset -c CPUS nice -n NICE``. The default is the
    machine's last CPU at nice 0, the same for every router in a comparison."""

    cpus: tuple[int, ...] = field(default_factory=lambda: ((os.cpu_count() or 1) - 1,))
    nice: int = 0

    def __post_init__(self) -> None:
        if not self.cpus or any(c < 0 for c in self.cpus):
            raise InputError("--router-cpus", "name at least one CPU (>= 0)")
        if not -20 <= self.nice <= 19:
            raise InputError("--router-nice", "must be in -20..19")

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, self.cpus)), "nice", "-n", str(self.nice),
                *argv]


@dataclass(frozen=True, slots=True)
class RouterCommand:
    argv: list[str]
    url: str  # base URL for clients
    ready_url: str


def executable(kind: str) -> str:
    """The peer's console script: beside this Python first (the venv), then on PATH."""
    name = EXECUTABLES[kind]
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RouterError(f"{name} is not installed: pip install 'netkv[peers]'")
    return found


def router_command(spec: RouterSpec, prefill: Sequence[Worker], decode: Sequence[Worker], *,
                   host: str, port: int, metrics_port: int,
                   netkv_args: Sequence[str] = ()) -> RouterCommand:
    """The command line of one router in front of these workers, listening on
    ``host:port`` (its Prometheus endpoint, for the peers, on ``metrics_port``).
    ``netkv_args`` are extra ``netkv proxy`` flags (topology, map feed, KV size)."""
    if not prefill or not decode:
        raise InputError("workers", "a router needs prefill and decode workers")
    url = f"http://{host}:{port}"
    if spec.kind == "netkv":
        argv = [sys.executable, "-m", "netkv.cli", "proxy", "--host", host, "--port", str(port),
                "--policy", spec.policy, "--mode", "pull", *netkv_args]
        for w in prefill:
            argv += ["--prefill", f"{w.url}={w.host}"]
        for w in decode:
            argv += ["--decode", f"{w.url}={w.host}"]
    elif spec.kind == "vllm-router":
        argv = [executable(spec.kind), "--vllm-pd-disaggregation", "--kv-connector", "nixl",
                "--policy", spec.policy, "--host", host, "--port", str(port),
                "--prometheus-host", host, "--prometheus-port", str(metrics_port),
                # start-up only: the engines are up before the router, check at once
                "--worker-startup-check-interval", "1", "--log-level", "warning"]
        for w in prefill:
            argv += ["--prefill", w.url]
        for w in decode:
            argv += ["--decode", w.url]
    else:
        argv = [executable(spec.kind), "launch", "--pd-disaggregation",
                "--policy", spec.policy, "--host", host, "--port", str(port),
                "--prometheus-host", host, "--prometheus-port", str(metrics_port),
                "--worker-startup-check-interval", "1", "--log-level", "warn"]
        for w in prefill:
            if w.bootstrap_port is None:
                raise InputError("workers", f"{w.url}: the SGLang router needs each "
                                 "prefill's bootstrap (side-channel) port")
            argv += ["--prefill", w.url, str(w.bootstrap_port)]
        for w in decode:
            argv += ["--decode", w.url]
    return RouterCommand(argv, url, url + READY_PATHS[spec.kind])


def spawn_local(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a router on this machine's loopback, in its own process group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                start_new_session=True)


class RouterProcess:
    """One running router; an async context manager (ready on entry, stopped on exit)."""

    def __init__(self, spec: RouterSpec, command: RouterCommand, spawn: Spawn, log_path: Path,
                 *, pinning: Pinning | None = None, ready_timeout_s: float = 60.0,
                 stop_timeout_s: float = 5.0) -> None:
        self.spec, self.command, self.spawn = spec, command, spawn
        self.log_path = log_path
        self.pinning = pinning or Pinning()
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_s = 0.0
        self.ready_after_s = 0.0

    @property
    def url(self) -> str:
        return self.command.url

    async def __aenter__(self) -> RouterProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.started_s = loop.time()
        self.proc = self.spawn(self.pinning.wrap(self.command.argv), self.log_path)
        log.info("router.start", router=self.spec.label, pid=self.proc.pid, url=self.url)
        try:
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise
        self.ready_after_s = loop.time() - self.started_s

    async def wait_ready(self) -> None:
        """Poll the readiness URL until it answers 200, the process exits, or time is up."""
        assert self.proc is not None
        try:
            await wait_http_ready(self.command.ready_url, self.proc.poll, self.ready_timeout_s,
                                  every_s=0.2)
        except ServerError as exc:
            raise RouterError(f"{self.spec.label} {exc}; {self.log_tail()}") from None

    def cpu_seconds(self) -> float:
        """CPU time the router (and its children) used so far; 0 once it is gone."""
        if self.proc is None:
            return 0.0
        try:
            p = psutil.Process(self.proc.pid)
            total = sum(p.cpu_times()[:2])
            for child in p.children(recursive=True):
                total += sum(child.cpu_times()[:2])
        except psutil.Error:
            return 0.0
        return float(total)

    async def stop(self) -> None:
        """TERM the process group, KILL after ``stop_timeout_s``; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        await asyncio.to_thread(stop_pids, [proc.pid], self.stop_timeout_s)
        try:
            await asyncio.to_thread(proc.wait, 2.0)
        except subprocess.TimeoutExpired:
            log.error("router.not_stopped", router=self.spec.label, pid=proc.pid)
        log.info("router.stop", router=self.spec.label, pid=proc.pid,
                 returncode=proc.returncode)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log_path})"
        return f"log {self.log_path}: " + " | ".join(text[-lines:])
