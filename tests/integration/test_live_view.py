"""The oracle's live congestion view in a real headless browser, during a real `netkv up --demo`.

Debian's chromium, driven by Playwright through its executable path (Playwright's own browser
download is not used). The page must receive live map updates over SSE, show the demo's hot
link (h003/nic/down, made hot on the emulated RDMA port the real agents read) as hot, then as
recovered, and show the scheduler's recent decisions. A screenshot taken while the link is hot
is saved in the test's directory (and copied to ``$NETKV_SCREENSHOT_DIR`` when set: that is how
``docs/img/live-view.png`` was made).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from netkv.localservers import free_port
from netkv.mesh.testkit import port_pair, read_until, udp_port_on_agents

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HOT = "h003/nic/down"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Debian's chromium is not installed (scripts/setup.sh test installs it)")


def test_the_view_shows_a_hot_link_live_and_its_recovery(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is part of the dev extras")
    chromium = _chromium()
    scheduler, oracle = free_port(), port_pair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "netkv.cli", "up", "--demo", "--workdir", str(tmp_path / "up"),
         "--scheduler-port", str(scheduler), "--oracle-port", str(oracle),
         "--echo-port", str(udp_port_on_agents()), "--demo-requests", "400",
         "--demo-rate", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=dict(os.environ))
    seen: list[bytes] = []
    try:
        out = read_until(proc, "running the demo", 120.0, seen)
        url = re.search(r"live view\s+(\S+)", out)
        assert url, out
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox", "--headless=new",
                                               "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url.group(1))
                # a live update: the SSE stream delivers maps, the version moves
                page.wait_for_function("Number(document.body.dataset.updates || 0) >= 2",
                                       timeout=30_000)
                first = int(page.get_attribute("#status", "data-version") or 0)
                page.wait_for_function(f"Number(document.querySelector('#status')"
                                       f".dataset.version) > {first}", timeout=30_000)
                assert page.get_attribute("#status", "data-stale") == "false"
                link = f'[data-link="{HOT}"]'
                # the demo makes the link hot a quarter into each replay (on a loaded machine
                # the page may open when the stretch has begun: then it is hot at once)
                page.wait_for_function("document.querySelectorAll('#decisions tbody tr')"
                                       ".length > 0", timeout=30_000)
                # hot on the drawing and in the status line at the same moment (one state)
                page.wait_for_function(
                    """([sel, hot]) => document.querySelector(sel).dataset.state === "hot"
                        && (document.body.dataset.hotLinks || "").includes(hot)
                        && document.querySelector("#status").textContent.includes(hot)""",
                    arg=[link, HOT], timeout=60_000, polling=100)
                shot = tmp_path / "live-view.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                if os.environ.get("NETKV_SCREENSHOT_DIR"):
                    shutil.copy(shot, Path(os.environ["NETKV_SCREENSHOT_DIR"]) / shot.name)
                # ... and recovers when the stretch ends: not hot for 2 s in a row (a loaded
                # machine can delay a counter update and dip one sample below the threshold)
                page.wait_for_function(
                    """([sel, hot]) => {
                        const ok = document.querySelector(sel).dataset.state === "ok"
                            && !(document.body.dataset.hotLinks || "").includes(hot);
                        if (!ok) { window.__okSince = null; return false; }
                        window.__okSince = window.__okSince || Date.now();
                        return Date.now() - window.__okSince >= 2000;
                    }""", arg=[link, HOT], timeout=60_000, polling=200)
                assert HOT not in (page.text_content("#status") or "")
            finally:
                browser.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode in (0, 130), b"".join(seen).decode()
