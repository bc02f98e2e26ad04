"""MQTT presence against a real mosquitto: ``online`` (retained) while alive, ``offline``
on a clean stop, and ``offline`` from the broker's last will when the agent process is
killed without a clean disconnect. Also the ``netkv agent --check`` healthcheck."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from helpers import until
from netkv_agent.agent import Agent
from netkv_agent.settings import AgentSettings

from netkv.adapters.redis_client import connect_redis
from netkv.config import MqttSettings, RedisSettings
from netkv.contracts.names import MqttTopics, RedisKeys
from netkv.localservers import MosquittoServer, RedisServer

pytestmark = pytest.mark.integration
TOPICS = MqttTopics()


async def statuses(broker: MosquittoServer, agent: str) -> AsyncIterator[str]:
    """Every status payload for ``agent`` (retained one first), forever."""
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"watch-{agent}") as client:
        await client.subscribe(TOPICS.agent_status(agent), qos=1)
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            yield payload.decode()


async def next_status(stream: AsyncIterator[str], limit_s: float = 10.0) -> str:
    return await asyncio.wait_for(anext(stream), limit_s)


async def test_online_then_offline_on_clean_stop(redis_server: RedisServer,
                                                 mosquitto_server: MosquittoServer) -> None:
    settings = AgentSettings(agent_id="h010", listen_address="127.0.0.60",
                             redis=RedisSettings(url=redis_server.url),
                             mqtt=MqttSettings(port=mosquitto_server.port))
    watch = statuses(mosquitto_server, "h010")
    try:
        async with Agent(settings) as agent:
            await asyncio.wait_for(agent.presence.online_published.wait(), 10)
            assert await next_status(watch) == "online"
        assert await next_status(watch) == "offline"
    finally:
        await watch.aclose()  # type: ignore[attr-defined]


async def _cli(*args: str, env: dict[str, str], log: Path | None = None
               ) -> asyncio.subprocess.Process:
    """``netkv agent ARGS`` as a child process; stderr (logs) to ``log`` or a pipe."""
    err: Any = asyncio.subprocess.PIPE
    if log is not None:
        err = log.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "netkv.cli", "agent", *args, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=err)
    finally:
        if log is not None:
            err.close()


async def _gone(redis: Any, key: str) -> bool:
    return int(await redis.exists(key)) == 0


async def test_killed_agent_process_goes_offline_by_last_will(
        redis_server: RedisServer, mosquitto_server: MosquittoServer, tmp_path: Path) -> None:
    env = dict(os.environ) | {"NETKV_HEARTBEAT_TTL_S": "1", "NETKV_MQTT__KEEPALIVE_S": "2"}
    common = ("--agent-id", "h011", "--redis-url", redis_server.url,
              "--mqtt-port", str(mosquitto_server.port))
    watch = statuses(mosquitto_server, "h011")
    proc = await _cli(*common, "--listen-address", "127.0.0.61", "--run-for", "60", env=env,
                      log=tmp_path / "agent.log")
    try:
        assert await next_status(watch, 20) == "online"
        check = await _cli(*common, "--check", env=env, log=tmp_path / "check.log")
        assert await asyncio.wait_for(check.wait(), 20) == 0  # heartbeat present
        proc.send_signal(signal.SIGKILL)  # no clean MQTT disconnect, no final flush
        await asyncio.wait_for(proc.wait(), 10)
        assert await next_status(watch, 15) == "offline"  # published by the broker (will)
        # the heartbeat key expires in Redis (TTL 1 s, Redis's clock); then --check says so
        async with connect_redis(RedisSettings(url=redis_server.url)) as redis:
            beat = RedisKeys().heartbeat("h011")
            await until(lambda: _gone(redis, beat), 10.0, what="the heartbeat expired")
        check = await _cli(*common, "--check", env=env, log=tmp_path / "check.log")
        assert await asyncio.wait_for(check.wait(), 20) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await watch.aclose()  # type: ignore[attr-defined]


async def test_sigterm_is_a_clean_shutdown(redis_server: RedisServer,
                                           mosquitto_server: MosquittoServer,
                                           tmp_path: Path) -> None:
    env = dict(os.environ)
    watch = statuses(mosquitto_server, "h012")
    proc = await _cli("--agent-id", "h012", "--listen-address", "127.0.0.62",
                      "--redis-url", redis_server.url, "--mqtt-port",
                      str(mosquitto_server.port), env=env, log=tmp_path / "agent.log")
    try:
        assert await next_status(watch, 20) == "online"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert await next_status(watch, 5) == "offline"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await watch.aclose()  # type: ignore[attr-defined]


async def test_bad_flags_exit_2_with_the_field_named() -> None:
    proc = await _cli("--agent-id", "h013", "--echo-port", "99999", env=dict(os.environ))
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"echo_port" in err
