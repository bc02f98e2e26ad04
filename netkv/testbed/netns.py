"""Network namespaces, veth pairs, bridges and tbf shaping, with a ledger for teardown.

A :class:`Lab` owns everything one testbed run creates. Every namespace and process is
written to a ledger file (``/run/netkv-testbed/<run>.json``) *before* it is created, so that
``netkv testbed down`` (or :func:`sweep`) can remove a run's leftovers after a crash or a
``kill -9``. Names carry the run's prefix (``nkv<run>-``). Veths are created directly inside
the namespaces (``ip -n NS link add ... peer ... netns NS2``): nothing is ever put in the root
namespace, and deleting a namespace deletes its interfaces, so removing the namespaces is
enough to remove every link.

Only ``tbf`` (and ``htb``/``pfifo``) exist on these machines, so bandwidth is emulated with a
tbf per egress direction and latency comes from real queueing; no netem.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import structlog

log = structlog.get_logger(__name__)

LEDGER_DIR = Path(os.environ.get("NETKV_TESTBED_STATE", "/run/netkv-testbed"))
NAME_PREFIX = "nkv"
_CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """A namespace command failed; the message holds the command and its stderr."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; failures raise :class:`LabError` with the command and stderr."""
    return _run(["ip", *args], check)


def tc(*args: str, check: bool = True) -> str:
    return _run(["tc", *args], check)


def _run(cmd: list[str], check: bool) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def list_namespaces() -> list[str]:
    """Names of every network namespace under /run/netns."""
    out = ip("netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False)
    return [int(x) for x in out.split() if x.isdigit()]


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def inside(ns: str | None) -> Iterator[None]:
    """Run the body with this thread in namespace ``ns`` (then switch back); ``None`` stays.

    A socket keeps the namespace it was created in, so the engines and the background
    flows open their sockets here and then use them from the normal event loop.
    """
    if ns is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns({ns}): {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover - would be fatal
                raise LabError(f"cannot return from namespace {ns}")
    finally:
        os.close(target)
        os.close(own)


@dataclass(frozen=True, slots=True)
class Shaping:
    """A tbf on one interface's egress: ``rate_bps`` bits/s, bounded queue in bytes."""

    rate_bps: float
    burst_bytes: int
    limit_bytes: int

    @classmethod
    def for_rate(cls, rate_bps: float, queue_s: float = 0.05) -> Shaping:
        """tbf needs burst >= rate/HZ and at least one MTU; the queue holds ``queue_s``."""
        burst = max(int(rate_bps / 8 / 250), 4 * 1514)
        limit = max(int(rate_bps / 8 * queue_s), 2 * burst)
        return cls(rate_bps, burst, limit)


@dataclass
class Ledger:
    """What a run created, persisted so teardown works after a crash."""

    run: str
    path: Path
    namespaces: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run": self.run, "namespaces": self.namespaces,
                                   "pids": self.pids, "extra": self.extra}))
        tmp.replace(self.path)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        data = json.loads(path.read_text())
        return cls(str(data["run"]), path, list(data["namespaces"]), list(data["pids"]),
                   dict(data.get("extra", {})))


class Lab:
    """Owner of one run's namespaces, links and processes; a context manager that always
    tears everything down (also on exceptions and Ctrl-C)."""

    def __init__(self, run: str | None = None, ledger_dir: Path = LEDGER_DIR) -> None:
        self.run = run or secrets.token_hex(2)
        self.prefix = f"{NAME_PREFIX}{self.run}-"
        self.ledger = Ledger(self.run, ledger_dir / f"{self.run}.json")
        self.procs: list[subprocess.Popen[bytes]] = []
        self._infrastructure: set[int] = set()
        self._logs: list[IO[bytes]] = []

    @classmethod
    def resume(cls, run: str, ledger_dir: Path = LEDGER_DIR) -> Lab:
        """The lab of a running testbed (``netkv testbed up``), from its ledger."""
        path = ledger_dir / f"{run}.json"
        if not path.exists():
            raise LabError(f"no running testbed {run!r} (no ledger at {path})")
        lab = cls(run, ledger_dir)
        lab.ledger = Ledger.load(path)
        return lab

    def detach(self) -> None:
        """Leave everything running (``up``); close our log handles only."""
        for f in self._logs:
            f.close()
        self._logs.clear()
        self.procs.clear()

    # -- namespaces and links -------------------------------------------------------------
    def ns(self, short: str) -> str:
        return f"{self.prefix}{short}"

    def add_namespace(self, short: str) -> str:
        name = self.ns(short)
        self.ledger.namespaces.append(name)
        self.ledger.save()
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "dev", "lo", "up")
        return name

    def add_veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        """A veth pair with one end in each namespace (created there, never in the root)."""
        ip("-n", ns_a, "link", "add", "name", if_a, "type", "veth", "peer", "name", if_b,
           "netns", ns_b)
        ip("-n", ns_a, "link", "set", "dev", if_a, "up")
        ip("-n", ns_b, "link", "set", "dev", if_b, "up")

    def add_bridge(self, ns: str, name: str = "br0") -> None:
        ip("-n", ns, "link", "add", "name", name, "type", "bridge", "stp_state", "0",
           "forward_delay", "0")
        ip("-n", ns, "link", "set", "dev", name, "up")

    def attach(self, ns: str, ifname: str, bridge: str = "br0") -> None:
        ip("-n", ns, "link", "set", "dev", ifname, "master", bridge)

    def address(self, ns: str, ifname: str, cidr: str) -> None:
        ip("-n", ns, "addr", "add", cidr, "dev", ifname)

    def set_mtu(self, ns: str, ifname: str, mtu: int) -> None:
        ip("-n", ns, "link", "set", "dev", ifname, "mtu", str(mtu))

    def shape(self, ns: str, ifname: str, shaping: Shaping) -> None:
        """Replace the interface's root qdisc with a tbf at the given rate."""
        tc("-n", ns, "qdisc", "replace", "dev", ifname, "root", "tbf",
           "rate", f"{int(shaping.rate_bps)}bit", "burst", str(shaping.burst_bytes),
           "limit", str(shaping.limit_bytes))

    # -- processes ------------------------------------------------------------------------
    def spawn(self, ns: str, argv: Sequence[str], log_path: Path,
              env: dict[str, str] | None = None, *, infrastructure: bool = False
              ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``ns`` in its own process group, logging to ``log_path``.

        ``infrastructure`` processes (Redis, the broker) are stopped last, so the others can
        flush and say goodbye through them.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("ab")
        self._logs.append(out)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs.append(proc)
        if infrastructure:
            self._infrastructure.add(proc.pid)
        self.ledger.pids.append(proc.pid)
        self.ledger.save()
        return proc

    # -- teardown -------------------------------------------------------------------------
    def teardown(self, timeout_s: float = 5.0) -> None:
        """Stop processes (TERM, then KILL; clients before infrastructure), then delete the
        namespaces; idempotent."""
        pids = list(dict.fromkeys([p.pid for p in self.procs] + self.ledger.pids))
        stop_pids([p for p in pids if p not in self._infrastructure], timeout_s)
        stop_pids(pids, timeout_s)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(0.5)
        for f in self._logs:
            f.close()
        self._logs.clear()
        remove_namespaces(self.ledger.namespaces, timeout_s)
        self.procs.clear()
        with contextlib.suppress(FileNotFoundError):
            self.ledger.path.unlink()
        log.info("testbed.teardown", run=self.run, namespaces=len(self.ledger.namespaces))

    def __enter__(self) -> Self:
        self.ledger.save()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()


def stop_pids(pids: Sequence[int], timeout_s: float = 5.0) -> None:
    """TERM each process group, wait up to ``timeout_s``, then KILL what is left."""
    alive = [p for p in dict.fromkeys(pids) if _alive(p)]
    for pid in alive:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        _signal_group(pid, signal.SIGKILL)


def remove_namespaces(names: Sequence[str], timeout_s: float = 5.0) -> None:
    """Kill whatever still runs inside each namespace, then delete it."""
    present = set(list_namespaces())
    for ns in names:
        if ns not in present:
            continue
        stop_pids(namespace_pids(ns), timeout_s)
        ip("netns", "del", ns, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - not ours
        return False
    # A zombie child counts as gone; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def sweep(ledger_dir: Path = LEDGER_DIR, run: str | None = None) -> list[str]:
    """Remove what crashed runs left: processes and namespaces in every ledger (or one run),
    plus any namespace carrying a run prefix. Returns the namespaces removed."""
    removed: list[str] = []
    if ledger_dir.exists():
        for path in sorted(ledger_dir.glob("*.json")):
            try:
                ledger = Ledger.load(path)
            except (OSError, ValueError, KeyError):
                path.unlink(missing_ok=True)
                continue
            if run is not None and ledger.run != run:
                continue
            stop_pids(ledger.pids)
            remove_namespaces(ledger.namespaces)
            removed += ledger.namespaces
            path.unlink(missing_ok=True)
    prefix = f"{NAME_PREFIX}{run}-" if run else NAME_PREFIX
    strays = [n for n in list_namespaces() if n.startswith(prefix) and "-" in n]
    remove_namespaces(strays)
    return removed + strays
