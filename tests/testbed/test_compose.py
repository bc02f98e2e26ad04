"""The compose testbed: build, bring the stack up, make a decision through the scheduler from
outside the compose network (the published loopback port), bring it down and check that no
container or network of the project is left. Skips, saying why, without a Docker engine,
docker-compose or a base image."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from netkv.localservers import free_port

pytestmark = [pytest.mark.compose, pytest.mark.testbed]
ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["redis", "mosquitto", "oracle", "scheduler", "spine", "h000", "h001", "h002", "h003"]


def _docker_unavailable() -> str | None:
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        return "docker and docker-compose are not installed (apt-get install docker.io " \
               "docker-compose)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        return f"no Docker engine is running (start `dockerd &`): {info.stderr.strip()[:200]}"
    return None


def _base_image() -> str | None:
    for image in (os.environ.get("NETKV_BASE_IMAGE"), "local/debian:bookworm",
                  "python:3.11-slim"):
        if image and subprocess.run(["docker", "image", "inspect", image],
                                    capture_output=True, check=False).returncode == 0:
            return image
    return None


@pytest.fixture
def compose_project() -> Iterator[tuple[list[str], dict[str, str], int]]:
    # CI prepares the engine (compose/ensure-engine.sh) and sets NETKV_REQUIRE_COMPOSE=1:
    # there a missing engine is a failure, not a skip.
    give_up = pytest.fail if os.environ.get("NETKV_REQUIRE_COMPOSE") == "1" else pytest.skip
    reason = _docker_unavailable()
    if reason:
        give_up(reason)
    base = _base_image()
    if base is None:
        give_up("no base image: run compose/build-base-image.sh (no registry here) or "
                "`docker pull python:3.11-slim`")
    assert base is not None
    project = f"netkvtest{secrets.token_hex(3)}"
    port = free_port()
    env = dict(os.environ, NETKV_BASE_IMAGE=base, NETKV_SCHEDULER_PORT=str(port))
    cmd = ["docker-compose", "-p", project, "-f", str(ROOT / "docker-compose.yml")]
    try:
        yield cmd, env, port
    finally:
        started = time.monotonic()
        subprocess.run([*cmd, "down", "-v", "--remove-orphans", "-t", "5"], env=env,
                       capture_output=True, check=False, timeout=180)
        print(f"compose down: {time.monotonic() - started:.1f}s")
        label = f"label=com.docker.compose.project={project}"
        for what in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
            left = subprocess.run(["docker", *what, "-q", "--filter", label],
                                  capture_output=True, text=True, check=False).stdout.split()
            assert not left, f"docker {' '.join(what)}: left after down: {left}"


def _get(url: str, body: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if body else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.timeout(900)
def test_compose_stack_decides_through_the_published_scheduler(
        compose_project: tuple[list[str], dict[str, str], int]) -> None:
    cmd, env, port = compose_project
    started = time.monotonic()
    build = subprocess.run([*cmd, "build"], env=env, capture_output=True, text=True,
                           check=False, timeout=900)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    built = time.monotonic()
    up = subprocess.run([*cmd, "up", "-d", *SERVICES], env=env, capture_output=True,
                        text=True, check=False, timeout=300)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    status, answer = 0, dict[str, object]()
    while time.monotonic() < deadline:
        try:
            status, answer = _get(base + "/v1/select", {
                "request_id": "compose-test", "prefill": "h000-p0", "prompt_tokens": 12000})
            if status == 200:
                break
        except OSError:
            pass
        time.sleep(1)
    print(f"compose build {built - started:.1f}s, up until first decision "
          f"{time.monotonic() - built:.1f}s")
    assert status == 200, answer
    assert answer["decode"] in {"h000-d1", "h001-d1", "h002-d1", "h003-d1"}
    assert float(str(answer["predicted_ttft_ms"])) > 0
    hosts = ("h000", "h001", "h002", "h003")
    healthy: list[str] = []
    while time.monotonic() < deadline and len(healthy) < len(hosts):
        ps = subprocess.run([*cmd, "ps"], env=env, capture_output=True, text=True,
                            check=False).stdout
        healthy = [h for h in hosts if any(f"_{h}_" in line and "(healthy)" in line
                                            for line in ps.splitlines())]
        time.sleep(1)
    assert len(healthy) == len(hosts), ps
    status, released = _get(base + "/v1/release", {"request_id": "compose-test"})
    assert status == 200 and released["released"] is True
