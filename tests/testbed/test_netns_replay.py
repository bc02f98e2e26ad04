"""The whole namespace testbed: real agents, Redis, Mosquitto, oracle and scheduler, emulated
engines moving real (scaled) KV bytes, and a background schedule that congests the core. On
the same replay, `netkv` moves KV caches at most 0.7x as slowly as `cache_load` on average and
its TTFT is lower; afterwards no namespace or process of the run is left."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from netkv.testbed.netns import list_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.testbed]


@pytest.mark.timeout(420)
def test_netkv_beats_cache_load_on_a_congested_core(netns_available: None, shared_trace: Path,
                                                    tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "netkv.cli", "testbed", "run", "--policies", "cache_load,netkv",
         "--count", "40", "--trace", str(shared_trace), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=400, check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = re.search(r"testbed (\w+): \d+ namespaces", proc.stdout)
    assert run, proc.stdout

    summary = json.loads((tmp_path / "summary.json").read_text())["policies"]
    base, netkv = summary["cache_load"], summary["netkv"]
    assert base["completed"] == netkv["completed"] == 40
    assert base["hot_link_transfers"] > 0, "the baseline never met the congested core"
    assert netkv["transfer_mean_s"] <= 0.7 * base["transfer_mean_s"], (netkv, base)
    assert netkv["ttft_mean_s"] < base["ttft_mean_s"], (netkv, base)

    prefix = f"nkv{run.group(1)}-"
    assert not [n for n in list_namespaces() if n.startswith(prefix)]
    workdir = f"/tmp/netkv-testbed/{run.group(1)}"
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if any(workdir in part for part in (p.info["cmdline"] or []))]
    assert not left, f"processes of the run left: {left}"


@pytest.mark.timeout(180)
def test_ctrl_c_during_a_run_tears_everything_down(netns_available: None, shared_trace: Path,
                                                   tmp_path: Path) -> None:
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "netkv.cli", "testbed", "run", "--count", "20",
             "--trace", str(shared_trace), "--out", str(tmp_path / "out")],
            stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    with proc.stdout:
        run = None
        for line in proc.stdout:  # wait until the fabric and the mesh are up
            found = re.search(r"testbed (\w+): \d+ namespaces", line)
            if found:
                run = found.group(1)
                break
        assert run, "the testbed never came up"
        prefix = f"nkv{run}-"
        assert [n for n in list_namespaces() if n.startswith(prefix)]
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 130, f"exit {code}; its stderr ends:\n{err_path.read_text()[-3000:]}"
    assert not [n for n in list_namespaces() if n.startswith(prefix)]
    workdir = f"/tmp/netkv-testbed/{run}"
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if any(workdir in part for part in (p.info["cmdline"] or []))]
    assert not left, f"processes of the run left: {left}"
    assert not (tmp_path / "out" / "summary.json").exists()
