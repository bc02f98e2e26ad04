"""Issue 9 finding 5, against a real redis-server run with the repo's configuration
(compose/redis.conf) and one ACL user per agent (netkv_oracle.identity.agent_acl_rules).

On the main branch before this change the agents' ACL users could not read the registry
(HGETALL on a shared hash they had no read right on), found 0 peers and probed nobody, while
they could HSET, EXPIRE or retype every other agent's entry. Now: the mesh covers every pair
under the ACLs as fast as without them, and an agent cannot write, expire, rename or retype
another agent's registry entry, heartbeat or stream; the map keys carry no TTL under a
volatile-* eviction policy, so eviction can never take the map."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from helpers import until
from netkv_agent.agent import Agent
from netkv_agent.settings import AgentSettings
from netkv_oracle.identity import agent_acl_rules
from netkv_oracle.service import OracleService
from netkv_oracle.testkit import oracle_settings
from redis.exceptions import NoPermissionError, ResponseError

from netkv.config import RedisSettings
from netkv.contracts.names import RedisKeys
from netkv.core.topology_file import parse_topology
from netkv.localservers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.security, pytest.mark.timeout(90)]

CONF = Path(__file__).resolve().parents[2] / "compose" / "redis.conf"
TOPO = parse_topology({"fabric": {"nic_gbps": 8}, "fat_tree": {}})  # 8 hosts
KEYS = RedisKeys()


def config_args(path: Path) -> tuple[str, ...]:
    """The file's directives as ``--name value`` arguments (what redis-server accepts)."""
    out: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            out += [f"--{name}", value.strip().strip('"')]
    return tuple(out)


@pytest.fixture
async def configured_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with RedisServer(workdir=tmp_path / "redis", extra_args=config_args(CONF)) as server:
        yield server


def password(agent: str) -> str:
    return f"pw-{agent}"


async def create_users(admin: aioredis.Redis) -> None:
    for host in TOPO.hosts:
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", host.name, *agent_acl_rules(KEYS, host.name, password(host.name)))


def settings(i: int, url: str, *, acl: bool) -> AgentSettings:
    name = TOPO.hosts[i].name
    redis = RedisSettings(url=url, username=name if acl else None,
                          password=password(name) if acl else None)
    return AgentSettings(agent_id=name, listen_address=f"127.0.4.{11 + i}", mqtt_enabled=False,
                         redis=redis, publish_interval_s=0.2, registry_refresh_s=0.5,
                         heartbeat_interval_s=0.2, probe_interval_leaf_s=0.1,
                         probe_interval_pod_s=0.2, probe_interval_core_s=0.4,
                         fabric_nic="lo", rdma_enabled=False)


async def full_mesh_seconds(url: str, *, acl: bool) -> float:
    """Seconds from start until every agent probes all 7 others (bounded: 20 s)."""
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        agents = [await stack.enter_async_context(Agent(settings(i, url, acl=acl), TOPO))
                  for i in range(TOPO.n_hosts)]
        await until(lambda: all(len(a.prober.peers) == TOPO.n_hosts - 1 for a in agents),
                    20.0, what=f"the full mesh under acl={acl}")
        took = time.monotonic() - started
        assert all(a.stats()["registry_errors"] == 0 for a in agents)
        return took


async def test_the_mesh_forms_under_acls_as_fast_as_without(
        configured_redis: RedisServer) -> None:
    async with aioredis.Redis.from_url(configured_redis.url) as admin:
        await create_users(admin)
        without = await full_mesh_seconds(configured_redis.url, acl=False)
        await admin.flushdb()
        with_acl = await full_mesh_seconds(configured_redis.url, acl=True)
    print(f"full mesh (8 agents, 56 pairs): {without:.2f} s default user, "
          f"{with_acl:.2f} s per-agent ACL users")
    # Same code path, same polling: equal up to scheduling noise on a shared machine.
    assert with_acl <= max(1.5 * without, without + 1.0), (with_acl, without)


async def test_an_agent_cannot_touch_another_agents_keys(configured_redis: RedisServer) -> None:
    async with aioredis.Redis.from_url(configured_redis.url) as admin:
        await create_users(admin)
        await admin.set(KEYS.registration("h001"), b"h001's entry", ex=60)
        await admin.set(KEYS.heartbeat("h001"), b"1", ex=60)
        mine = aioredis.Redis(host=configured_redis.host, port=configured_redis.port,
                              username="h000", password=password("h000"))
        async with mine:
            other, beat = KEYS.registration("h001"), KEYS.heartbeat("h001")
            # what an agent needs works: its own keys, and reading its peers' entries
            await mine.set(KEYS.registration("h000"), b"mine", ex=60)
            await mine.set(KEYS.heartbeat("h000"), b"1", ex=5)
            await mine.xadd(KEYS.samples_stream("h000"), {"batch": b"x"}, maxlen=10)
            assert await mine.get(other) == b"h001's entry"
            assert await mine.mget([other, beat]) == [b"h001's entry", b"1"]
            names = [k async for k in mine.scan_iter(match=KEYS.registrations_pattern)]
            assert {n.decode() for n in names} == {KEYS.registration("h000"), other}
            # what it must not do to another agent's entry, heartbeat or stream
            attacks = [
                mine.set(other, b"forged"), mine.hset(other, "f", "v"), mine.expire(other, 1),
                mine.persist(other), mine.delete(other), mine.rename(other, "x"),
                mine.getdel(other), mine.set(beat, b"1"), mine.expire(beat, 100),
                mine.xadd(KEYS.samples_stream("h001"), {"batch": b"x"}),
                mine.set(KEYS.map_snapshot, b"forged"), mine.xrange(KEYS.samples_stream("h000")),
                mine.execute_command("CONFIG", "SET", "maxmemory", "0"),  # type: ignore[no-untyped-call]
                mine.flushall(),
            ]
            for attack in attacks:
                with pytest.raises((NoPermissionError, ResponseError)):
                    await attack
        assert await admin.get(other) == b"h001's entry"
        assert await admin.ttl(other) > 50  # not expired, not persisted
        assert await admin.type(other) == b"string"  # not retyped


async def test_the_configuration_bounds_memory_and_cannot_evict_the_map(
        configured_redis: RedisServer) -> None:
    async with aioredis.Redis.from_url(configured_redis.url) as admin:
        config = await admin.config_get("maxmemory*")
        assert int(str(config["maxmemory"])) == 256 * 1024 * 1024
        assert str(config["maxmemory-policy"]).startswith("volatile-")
        # Under volatile-* only keys with a TTL are eviction candidates: the map the oracle
        # publishes has none.
        async with OracleService(oracle_settings(configured_redis.url, 1, oracle_id="o1"),
                                 TOPO, mqtt=False) as oracle:
            await until(lambda: oracle.publisher.version > 0, 10)
        for key in (KEYS.map_snapshot, KEYS.map_version):
            assert await admin.exists(key) and await admin.ttl(key) == -1, key
