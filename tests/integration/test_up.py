"""`netkv up` as a user runs it: a real process tree, supervised, nothing left behind.

Every test gives `netkv up` ports the OS just reported free (the fixed defaults may be taken
by someone else on a shared machine) and checks, at the end, that no child process is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from netkv.localservers import free_port
from netkv.mesh.testkit import port_free, port_pair, read_until, udp_port_on_agents

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def ports_args() -> list[str]:
    return ["--scheduler-port", str(free_port()), "--oracle-port", str(port_pair()),
            "--echo-port", str(udp_port_on_agents())]


@pytest.fixture
def up_cmd(tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "netkv.cli", "up", "--workdir", str(tmp_path / "up")]


def start(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=dict(os.environ))


def no_children_left(children: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [(p.pid, p.name()) for p in alive]


def pid_of(out: str, name: str) -> int:
    match = re.search(rf"^\s+{name}\s+\S+\s+\(pid (\d+)\)", out, re.M)
    assert match, out
    return int(match.group(1))


def test_up_then_sigint_leaves_nothing_behind_and_keeps_the_logs(up_cmd: list[str]) -> None:
    proc = start([*up_cmd, *ports_args()])
    try:
        out = read_until(proc, "Ctrl-C stops everything", 90.0)
        tcp = [(h, int(p)) for h, p in re.findall(r"(?:redis|mqtt|http)://([\d.]+):(\d+)", out)]
        udp = [(h, int(p)) for h, p in re.findall(r"udp://([\d.]+):(\d+)", out)]
        workdir = Path(re.findall(r"logs\s+(\S+)", out)[0])
        assert len(tcp) >= 5 and len(udp) == 8, out  # redis, mqtt, 2 oracles, scheduler
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 13, out
        for host, port in tcp:
            assert not port_free(host, port, socket.SOCK_STREAM), (host, port)
        token_file = workdir / "scheduler.token"
        token = token_file.read_text().strip()
        assert token_file.stat().st_mode & 0o077 == 0
        assert token not in out and token[:4] in out  # never printed in full
        for child in children:  # no secret in any child's argv
            assert token not in " ".join(child.cmdline())
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0, out + rest
        assert "netkv up: stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    no_children_left(children)
    for host, port in tcp:
        assert port_free(host, port, socket.SOCK_STREAM), (host, port)
    for host, port in udp:
        assert port_free(host, port, socket.SOCK_DGRAM), (host, port)
    assert (workdir / "scheduler.log").stat().st_size > 0  # logs kept


def test_a_busy_port_is_one_line_naming_it(up_cmd: list[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([*up_cmd, "--no-agents", "--scheduler-port", str(port),
                               "--oracle-port", str(port_pair())], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"netkv up: port {port} on 127.0.0.1 (scheduler) is already in use; stop "
                     "what holds it or choose another with --scheduler-port"], proc.stderr
    assert "listening" not in proc.stdout and "Traceback" not in proc.stderr


def test_a_child_killed_with_sigkill_stops_the_mesh_with_exit_1(up_cmd: list[str]) -> None:
    proc = start([*up_cmd, "--no-agents", "--no-standby", *ports_args()])
    try:
        out = read_until(proc, "Ctrl-C stops everything", 90.0)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(pid_of(out, "scheduler"), signal.SIGKILL)
        rest = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out + rest
    assert "netkv up: scheduler was killed by SIGKILL while the mesh was running" in rest, rest
    assert "Traceback" not in rest
    no_children_left(children)


def test_a_child_that_never_becomes_ready_is_named_with_exit_1(up_cmd: list[str]) -> None:
    # A Redis nobody listens on: the oracle runs but can never lead or serve a map.
    dead_redis = free_port()
    proc = subprocess.run([*up_cmd, "--no-agents", "--no-standby", *ports_args(),
                           "--redis-url", f"redis://:s3cret-pw@127.0.0.1:{dead_redis}/0",
                           "--ready-timeout", "8"], capture_output=True, text=True,
                          timeout=90, stdin=subprocess.DEVNULL, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    # what its check said: "answered 503" (no map), or, on a loaded machine where the
    # process has not even bound its port yet, the connection error
    assert re.search(r"netkv up: oracle \(pid \d+\) not ready after 8 s: http://127.0.0.1:\d+"
                     r"/readyz(?: answered 503|: ClientConnectorError)", proc.stderr), out
    assert "listening" not in proc.stdout and "Traceback" not in proc.stderr
    assert "s3cret-pw" not in out  # the password is never printed
    for path in Path(up_cmd[-1]).rglob("*"):  # ... nor written anywhere but 0600 files
        if path.is_file() and "s3cret-pw" in path.read_text(errors="replace"):
            assert path.stat().st_mode & 0o077 == 0, path
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if up_cmd[-1] in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, leftovers


def _readyz(port: int) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            body: dict[str, object] = json.loads(resp.read())
            return body
    except OSError:
        return {}


def _healthz_detail(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return str(json.loads(resp.read()).get("detail"))
    except OSError:
        return ""


def test_a_killed_oracle_costs_a_few_seconds_of_stale_map(up_cmd: list[str]) -> None:
    scheduler = free_port()
    oracle = port_pair()
    proc = start([*up_cmd, "--no-agents", "--scheduler-port", str(scheduler),
                  "--oracle-port", str(oracle)])
    try:
        out = read_until(proc, "Ctrl-C stops everything", 90.0)
        children = psutil.Process(proc.pid).children(recursive=True)
        leader = next((p for p in (oracle, oracle + 1) if _healthz_detail(p) == "leader"), None)
        assert leader is not None, out
        name = "oracle" if leader == oracle else "standby oracle"
        before = _readyz(scheduler)
        os.kill(pid_of(out, name), signal.SIGKILL)
        worst_age, last_version = 0.0, before.get("map_version")
        deadline = time.monotonic() + 12.0
        while time.monotonic() < deadline:
            body = _readyz(scheduler)
            age = body.get("map_age_s")
            if isinstance(age, int | float):
                worst_age = max(worst_age, float(age))
            last_version = body.get("map_version", last_version)
            time.sleep(0.2)
        assert isinstance(last_version, int) and isinstance(before["map_version"], int)
        assert last_version > before["map_version"], (before, last_version)
        print(f"map age after killing the {name} leader: worst {worst_age:.2f} s")
        assert worst_age <= 6.0, worst_age  # the standby took over within the lease
        assert proc.poll() is None  # a dead oracle is restarted, not fatal
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"netkv up: {name} was killed by SIGKILL; restarting it" in rest, rest
    assert proc.returncode == 0, rest
    no_children_left(children)


def test_up_demo_prints_the_side_by_side_table(up_cmd: list[str]) -> None:
    proc = subprocess.run(
        [*up_cmd, "--demo", *ports_args(), "--demo-requests", "600", "--demo-rate", "40"],
        capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL,
        env=dict(os.environ), check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "hot link: h003/nic/down (emulated RDMA counters" in out, out
    row = re.search(r"decisions \(errors\)\s+(\d+) \((\d+)\)\s+(\d+) \((\d+)\)", out)
    assert row and row.groups() == ("600", "0", "600", "0"), out
    hot = re.search(r"sent across the hot link\s+\d+ \((\d+)%\)\s+\d+ \((\d+)%\)", out)
    quiet = re.search(r"same link, while quiet\s+\d+ \((\d+)%\)\s+\d+ \((\d+)%\)", out)
    assert hot and quiet, out
    cache_load_hot, netkv_hot = (int(x) for x in hot.groups())
    _, netkv_quiet = (int(x) for x in quiet.groups())
    assert netkv_hot < netkv_quiet, out  # netkv moves decisions off the link while it is hot
    assert netkv_hot < cache_load_hot, out  # ... and cache_load does not
    assert "live view: http://127.0.0.1:" in out
    assert out.rstrip().splitlines()[-1].startswith("netkv up: stopped; logs kept in")


def test_an_empty_token_from_the_environment_is_an_error(up_cmd: list[str]) -> None:
    proc = subprocess.run([*up_cmd, "--no-agents"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env={**os.environ, "NETKV_TOKEN": ""},
                          check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == ("netkv up: error: NETKV_TOKEN: is set but empty; unset it "
                                   "to have a token generated"), proc.stderr
