"""`netkv oracle` as a process: config file + NETKV_* environment, serves, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from helpers import until
from netkv_oracle.testkit import get_json

from netkv.localservers import MosquittoServer, RedisServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_netkv_oracle_serves_and_stops_cleanly(
        tmp_path: Path, redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    config = tmp_path / "netkv.yaml"
    config.write_text(json.dumps({
        "redis": {"url": redis_server.url},
        "mqtt": {"port": mosquitto_server.port},
        "oracle": {"sample_interval_s": 0.5, "oracle_id": "cli"}}))
    port = free_port()
    env = {**os.environ, "NETKV_HTTP_PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netkv.cli", "oracle", "--config", str(config),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async def ready() -> bool:
            try:
                status, body = await get_json(port, "/readyz")
            except OSError:
                return False
            return status == 200 and "version" in body["detail"]

        await until(ready, 20, 0.2)
        status, body = await get_json(port, "/v1/cost", src="h000", dst="h007", bytes="1e9")
        assert status == 200 and body["tier"] == 3 and body["confidence"] == 0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 15)
    assert rc == 0


async def test_bad_config_is_an_input_error(tmp_path: Path) -> None:
    config = tmp_path / "netkv.yaml"
    config.write_text(json.dumps({"oracle": {"sample_interval_s": -1}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netkv.cli", "oracle", "--config", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"sample_interval_s" in err
