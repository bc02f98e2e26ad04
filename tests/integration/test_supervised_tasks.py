"""A background task that dies is noticed (issue 8): the oracle's /readyz and /healthz turn 503
naming it; the agent records it and `netkv agent` exits non-zero. And a failed oracle start-up
leaves nothing running. Real redis-server and mosquitto; the fault is a loop that raises an
error its own handlers do not expect (a bug), injected by replacing one method."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from helpers import until
from netkv_agent import cli as agent_cli
from netkv_agent.agent import Agent
from netkv_agent.settings import AgentSettings
from netkv_oracle.service import OracleService
from netkv_oracle.testkit import get_json, oracle_settings

from netkv.config import RedisSettings
from netkv.core.topology_file import parse_topology
from netkv.localservers import MosquittoServer, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(60)]

TOPO = parse_topology({"fabric": {"nic_gbps": 8}, "fat_tree": {}})


class InjectedError(RuntimeError):
    """The injected bug."""


def _raise(*_: Any, **__: Any) -> Any:
    raise InjectedError("injected fault")


async def test_a_dead_oracle_task_fails_readiness_and_health(
        redis_server: RedisServer, mosquitto_server: MosquittoServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = oracle_settings(redis_server.url, mosquitto_server.port, oracle_id="o1")
    async with OracleService(settings, TOPO) as oracle:
        await until(lambda: oracle.leading and oracle.publisher.version > 0, 5)
        assert (await get_json(oracle.port, "/readyz"))[0] == 200
        monkeypatch.setattr(oracle.publisher, "publish", _raise)
        oracle.builder.changed = True  # the next publish round runs into the fault
        failure = await asyncio.wait_for(oracle.supervisor.wait_failed(), 5)
        assert failure.name.endswith(".publish") and "InjectedError" in failure.reason
        for path in ("/readyz", "/healthz"):
            status, body = await get_json(oracle.port, path)
            assert status == 503, path
            assert "publish" in str(body) and "InjectedError" in str(body), body


async def test_a_failed_oracle_start_leaves_nothing_running(
        redis_server: RedisServer, mosquitto_server: MosquittoServer) -> None:
    with socket.socket() as taken:  # the HTTP port is in use: start-up fails at the site
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = oracle_settings(redis_server.url, mosquitto_server.port, oracle_id="o2",
                                   http_port=taken.getsockname()[1])
        oracle = OracleService(settings, TOPO)
        before = set(asyncio.all_tasks())
        with pytest.raises(OSError, match="address already in use|Address already in use"):
            await oracle.__aenter__()
    assert oracle._http is None  # the HTTP server was cleaned up
    assert set(asyncio.all_tasks()) - before == set()  # no background task left
    assert oracle.supervisor.failures == ()


def _agent_settings(url: str) -> AgentSettings:
    return AgentSettings(agent_id="h000", listen_address="127.0.0.91", mqtt_enabled=False,
                         redis=RedisSettings(url=url), fabric_nic="lo",
                         counter_interval_s=0.1, publish_interval_s=0.1, rdma_enabled=False)


@pytest.fixture
def broken_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Agent, "read_counters", _raise)


@pytest.mark.usefixtures("broken_counters")
async def test_a_dead_agent_task_is_recorded(redis_server: RedisServer) -> None:
    async with Agent(_agent_settings(redis_server.url), TOPO) as agent:
        failure = await asyncio.wait_for(agent.wait_failed(), 5)
        assert failure.name.endswith(".publish") and "InjectedError" in failure.reason
        assert agent.stats()["failed_tasks"] == [failure.name]


@pytest.mark.usefixtures("broken_counters")
async def test_netkv_agent_exits_non_zero_when_a_task_dies(redis_server: RedisServer) -> None:
    code = await asyncio.wait_for(
        agent_cli.serve(_agent_settings(redis_server.url), run_for=20.0), 10)
    assert code == 1


async def test_netkv_agent_exits_zero_when_nothing_died(redis_server: RedisServer) -> None:
    code = await agent_cli.serve(_agent_settings(redis_server.url), run_for=0.5)
    assert code == 0
