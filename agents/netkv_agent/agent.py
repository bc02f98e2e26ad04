"""The agent: one async context manager that owns every probe, reader and publisher task.

::

    async with Agent(settings, topology) as agent:
        await agent.run_for(10.0)          # or: await agent.wait_closed()  (runs until cancelled)
        print(agent.stats())

Entering binds the UDP echo socket (responder + prober) on the agent's own address, opens the
Redis client and, when interfaces are configured, a netlink socket; then starts, under one
:class:`~netkv.supervisor.Supervisor`: the prober (echo ticks), the publisher (which also
reads the NIC, qdisc and RDMA counters when due and collects RTT samples), the registry
watcher (peers and pinglist) and MQTT presence. Few tasks and few timers on purpose: each
event-loop wake-up costs real CPU, and the agent must stay around 1% of a core. Leaving shuts
down in order, each step bounded: stop probing and reading; publish what was measured (final
flush) and drop the heartbeat; announce ``offline`` on MQTT; then close sockets and clients. A task
that dies is logged and recorded by the supervisor (:attr:`Agent.failures`,
:meth:`Agent.wait_failed`), and ``netkv agent`` then exits non-zero rather than carrying on as
a half-alive agent; expected faults (Redis or broker down, missing interfaces, malformed
registry entries) are handled and counted inside the tasks. The agent's own loops end only
when it stops (``_stopping``), so they are supervised as tasks that may return; the prober
and presence run until cancelled, so their returning early is a failure too.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import deque
from types import TracebackType
from typing import Any, Self

import structlog
from redis.exceptions import RedisError

import netkv
from netkv.adapters.redis_client import connect_redis
from netkv.contracts.names import RedisKeys
from netkv.contracts.registration import (
    Registration,
    RegistrationError,
    decode_registration,
    read_registry,
)
from netkv.core.topology import Topology
from netkv.errors import InputError
from netkv.supervisor import Supervisor, TaskFailure
from netkv.tasks import cancel_and_wait
from netkv_agent.bandwidth import BurstResult, bandwidth_sink, burst
from netkv_agent.bindings import check_identity, link_bindings
from netkv_agent.echo import Prober, echo_endpoint
from netkv_agent.nic import NicReader
from netkv_agent.pinglist import Endpoint, build_pinglist
from netkv_agent.presence import Presence
from netkv_agent.publisher import Publisher
from netkv_agent.qdisc import QdiscReader
from netkv_agent.rdma import RdmaReader
from netkv_agent.rtnetlink import RouteSocket
from netkv_agent.settings import AgentSettings

log = structlog.get_logger(__name__)

STEP_TIMEOUT_S = 1.0


class Agent:
    """One host's (or switch's) agent. See the module docstring for the lifecycle."""

    def __init__(self, settings: AgentSettings, topology: Topology | None = None) -> None:
        if not settings.agent_id:
            raise InputError("agent_id", "an agent needs an identity (--agent-id)")
        check_identity(settings, topology)
        self.settings = settings
        self.topology = topology
        self.keys = RedisKeys(settings.redis.prefix)
        self.nic_links, self.rdma_links = link_bindings(settings, topology)
        self.prober = Prober(settings.agent_id, timeout_s=settings.probe_timeout_s,
                             window_s=settings.rtt_window_s, tick_s=settings.echo_tick_s)
        # /sys/class/net shows this process's namespace: useless for interfaces in another one
        self.nics = NicReader(settings.agent_id, settings.interfaces, settings.nic_speed_gbps,
                              settings.sysfs_net_root if settings.netns is None else "")
        self.qdiscs = QdiscReader(settings.agent_id, settings.interfaces)
        self.rdma = RdmaReader(settings.agent_id, settings.rdma_sysfs_root,
                               settings.rdma_devices, settings.rdma_data_unit_bytes)
        self.presence = Presence(settings.mqtt, settings.agent_id)
        self.publisher: Publisher | None = None
        self.endpoint: tuple[str, int] | None = None
        self.started = time.time()
        self.peers: dict[str, Endpoint] = {}
        self.bandwidth_ports: dict[str, int] = {}
        self.bandwidth_results: deque[BurstResult] = deque(maxlen=16)
        self.bandwidth_errors = 0
        self._bandwidth_port = 0
        self.registry_rejected = 0
        self.registry_errors = 0
        self._registry_ok = True
        self._decoded: dict[bytes, Registration | None] = {}  # registry entry -> decoded
        self.counter_errors = 0
        self.samples_by_kind: dict[str, int] = {}
        self._stack = contextlib.AsyncExitStack()
        self.supervisor = Supervisor(f"agent-{settings.agent_id}",
                                     stop_timeout_s=STEP_TIMEOUT_S)
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._route: RouteSocket | None = None
        self._closed = asyncio.Event()
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        s = self.settings
        stack = self._stack
        try:
            redis = await stack.enter_async_context(connect_redis(s.redis, retries=1))
            self.endpoint = await stack.enter_async_context(
                echo_endpoint(self.prober, s.listen_address, s.echo_port))
            if s.interfaces:
                self._route = await stack.enter_async_context(RouteSocket(netns=s.netns))
            if s.bandwidth_probe_enabled:
                _, self._bandwidth_port = await stack.enter_async_context(
                    bandwidth_sink(s.listen_address, s.bandwidth_port))
            self.publisher = Publisher(
                redis, self.keys, s.agent_id, registration=self.registration,
                publish_interval_s=s.publish_interval_s,
                heartbeat_interval_s=s.heartbeat_interval_s, heartbeat_ttl_s=s.heartbeat_ttl_s,
                stream_maxlen=s.stream_maxlen, max_buffered_batches=s.max_buffered_batches,
                max_batch_samples=s.max_batch_samples, op_timeout_s=s.redis_op_timeout_s,
                max_backoff_s=s.reconnect_max_backoff_s)
            sup = await stack.enter_async_context(self.supervisor)
            self._tasks = {
                "probe": sup.spawn(self.prober.run(), name="probe"),
                "registry": sup.spawn(self._registry_loop(redis), name="registry",
                                      daemon=False),
                "publish": sup.spawn(self._publish_loop(), name="publish", daemon=False),
            }
            if s.bandwidth_probe_enabled:
                self._tasks["bandwidth"] = sup.spawn(self._bandwidth_loop(), name="bandwidth",
                                                     daemon=False)
            if s.mqtt_enabled:
                self._tasks["presence"] = sup.spawn(self.presence.run(), name="presence")
        except BaseException:
            await stack.aclose()
            raise
        log.info("agent started", agent=s.agent_id, endpoint=self.endpoint,
                 interfaces=list(s.interfaces))
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        try:
            await self._shutdown()
        finally:
            self._closed.set()
            result = await self._stack.__aexit__(et, e, tb)
        return result

    async def _cancel(self, *names: str) -> None:
        """Cancel tasks and wait (bounded) until they end. Cancellation is repeated: a
        library may swallow one (redis-py's asyncio client does, now and then), and each
        loop also checks ``_stopping``, so a task ends at its next iteration regardless."""
        await cancel_and_wait([self._tasks[n] for n in names if n in self._tasks],
                              STEP_TIMEOUT_S)

    async def _shutdown(self) -> None:
        """Ordered, bounded: stop measuring, publish the rest, say offline, then close."""
        self._stopping = True
        self.prober.stop()
        await self._cancel("probe", "registry", "bandwidth")
        if self.publisher is not None and "publish" in self._tasks:
            await self._cancel("publish")
            self.publisher.submit(self.prober.collect())
            await self.publisher.final_flush(STEP_TIMEOUT_S)
            await self.publisher.deregister(STEP_TIMEOUT_S)
        if "presence" in self._tasks:
            await self.presence.announce_offline(STEP_TIMEOUT_S)
            await self._cancel("presence")
        log.info("agent stopped", agent=self.settings.agent_id)

    async def run_for(self, seconds: float) -> None:
        """Let the agent work for ``seconds`` (bounded mode for tests and benchmarks)."""
        await asyncio.sleep(seconds)

    @property
    def failures(self) -> tuple[TaskFailure, ...]:
        """Background tasks that died (empty while the agent is whole)."""
        return self.supervisor.failures

    async def wait_failed(self) -> TaskFailure:
        """Wait until a background task dies (``netkv agent`` then exits non-zero)."""
        return await self.supervisor.wait_failed()

    async def wait_closed(self) -> None:
        """Block until the agent is shut down (cancel the caller to stop it)."""
        await self._closed.wait()

    # -- identity --------------------------------------------------------------------------
    def registration(self) -> Registration:
        port = self.endpoint[1] if self.endpoint else 0
        return Registration(
            agent=self.settings.agent_id, address=self.settings.address, echo_port=port,
            version=netkv.__version__, started=self.started,
            bandwidth_port=self._bandwidth_port,
            nics=tuple(self.settings.interfaces), links=dict(self.nic_links),
            rdma=dict(self.rdma_links))

    # -- tasks -----------------------------------------------------------------------------
    def _submit(self, samples: list[Any]) -> None:
        if not samples or self.publisher is None:
            return
        for sample in samples:
            self.samples_by_kind[sample.kind] = self.samples_by_kind.get(sample.kind, 0) + 1
        self.publisher.submit(samples)

    async def _publish_loop(self) -> None:
        """Every publish interval: read counters when due, collect RTT samples, publish.
        Counters are read in the same wake-up as the publish (one timer, not two), so their
        samples leave the host with no extra delay."""
        assert self.publisher is not None
        next_counters = 0.0
        while not self._stopping:
            now = time.monotonic()
            if now >= next_counters:
                next_counters = now + self.settings.counter_interval_s - 0.01
                await self.read_counters()
            self._submit(self.prober.collect())
            await self.publisher.step()
            await asyncio.sleep(self.settings.publish_interval_s)

    async def read_counters(self) -> None:
        """One round of NIC, qdisc and RDMA reads (each guarded: one failing reader does not
        stop the others)."""
        s = self.settings
        if self._route is not None:
            try:  # synchronous: the kernel answers rtnetlink requests inside send()
                self._submit(self.nics.read(self._route))
                if s.qdisc_enabled:
                    self._submit(self.qdiscs.read(self._route, self.nics.index))
            except (OSError, ValueError, KeyError, struct.error) as exc:
                self.counter_errors += 1
                log.warning("netlink read failed", error=str(exc))
        if s.rdma_enabled:
            try:
                self._submit(list(self.rdma.read()))
            except OSError as exc:
                self.counter_errors += 1
                log.warning("rdma read failed", error=str(exc))

    async def refresh_peers(self, redis: Any) -> bool:
        """Read the registry and live heartbeats; rebuild the pinglist. False if Redis failed."""
        try:
            async with asyncio.timeout(self.settings.redis_op_timeout_s):
                entries = await read_registry(redis, self.keys)
            regs: list[Registration] = []
            decoded: dict[bytes, Registration | None] = {}
            for field_name, raw in entries.items():
                # Entries are re-written unchanged with every heartbeat: decode each distinct
                # entry once (a rejected one is counted and logged once, too).
                if raw in self._decoded:
                    reg = decoded[raw] = self._decoded[raw]
                else:
                    try:
                        reg = decoded[raw] = decode_registration(raw)
                    except RegistrationError as exc:
                        decoded[raw] = None
                        self.registry_rejected += 1
                        log.warning("registry entry rejected", field=str(field_name),
                                    error=str(exc))
                        continue
                if reg is not None:
                    regs.append(reg)
            self._decoded = decoded
            alive: list[Any] = []
            if regs:
                async with asyncio.timeout(self.settings.redis_op_timeout_s):
                    alive = await redis.mget([self.keys.heartbeat(r.agent) for r in regs])
        except (RedisError, OSError, TimeoutError) as exc:
            # warning, not debug: an agent that cannot read the registry probes nobody
            # (e.g. an ACL user without read access to its peers' entries)
            if self._registry_ok:
                log.warning("registry refresh failed", error=str(exc))
            self._registry_ok = False
            self.registry_errors += 1
            return False
        if not self._registry_ok:
            log.info("registry readable again")
        self._registry_ok = True
        live = [r for r, beat in zip(regs, alive, strict=True) if beat is not None]
        self.peers = {r.agent: (r.address, r.echo_port) for r in live}
        self.bandwidth_ports = {r.agent: r.bandwidth_port for r in live if r.bandwidth_port}
        self.prober.set_peers(build_pinglist(self.settings, self.topology, self.peers,
                                             time.time()))
        return True

    def _expected_peers(self) -> int:
        if self.topology is None:
            return 0
        return self.topology.n_hosts  # every host registered, this one included

    async def _registry_loop(self, redis: Any) -> None:
        fast = min(0.5, self.settings.registry_refresh_s)
        start = time.monotonic()
        previous: set[str] = set()
        while not self._stopping:
            ok = await self.refresh_peers(redis)
            current = set(self.peers)
            # Poll fast while the mesh is forming (start-up, peers arriving or leaving, Redis
            # unreachable), so a fresh mesh converges in about a second.
            converging = (not ok or current != previous
                          or len(current) < self._expected_peers()
                          or time.monotonic() - start < 3.0)
            previous = current
            await asyncio.sleep(fast if converging else self.settings.registry_refresh_s)

    async def _bandwidth_loop(self) -> None:
        """Every interval, one rate-capped burst to the next pinglist peer with a sink."""
        s = self.settings
        turn = 0
        while not self._stopping:
            await asyncio.sleep(s.bandwidth_probe_interval_s)
            candidates = sorted(n for n in self.prober.peers if n in self.bandwidth_ports)
            if not candidates:
                continue
            peer = candidates[turn % len(candidates)]
            turn += 1
            try:
                result = await burst(peer, self.peers[peer][0], self.bandwidth_ports[peer],
                                     s.bandwidth_probe_bytes,
                                     s.bandwidth_probe_rate_mbps * 1e6 / 8)
            except (OSError, TimeoutError, KeyError) as exc:
                self.bandwidth_errors += 1
                log.warning("bandwidth probe failed", peer=peer, error=str(exc))
                continue
            self.bandwidth_results.append(result)
            log.info("bandwidth probe", peer=peer, bytes_s=round(result.bytes_s),
                     seconds=round(result.seconds, 3))

    # -- observability ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A flat snapshot of the agent's counters (for tests, benchmarks and logs)."""
        pub = self.publisher.stats if self.publisher else None
        echo = self.prober.counters
        return {
            "agent": self.settings.agent_id, "endpoint": self.endpoint,
            "peers_registered": len(self.peers), "pinglist": len(self.prober.peers),
            "probes_sent": echo.probes_sent, "replies": echo.replies, "lost": echo.lost,
            "late": echo.late, "malformed": echo.malformed, "unexpected": echo.unexpected,
            "requests_answered": echo.requests_answered, "send_errors": echo.send_errors,
            "echo_ticks": echo.ticks, "probe_rounds": echo.rounds,
            "samples_by_kind": dict(self.samples_by_kind),
            "batches_published": pub.batches_published if pub else 0,
            "samples_published": pub.samples_published if pub else 0,
            "dropped_batches": pub.dropped_batches if pub else 0,
            "dropped_samples": pub.dropped_samples if pub else 0,
            "publish_errors": pub.publish_errors if pub else 0,
            "buffered_batches": self.publisher.buffered_batches if self.publisher else 0,
            "redis_connected": pub.connected if pub else False,
            "mqtt_connected": self.presence.connected,
            "registry_rejected": self.registry_rejected,
            "registry_errors": self.registry_errors,
            "counter_errors": self.counter_errors,
            "nic_missing": self.nics.missing, "nic_resets": self.nics.resets(),
            "rdma_resets": self.rdma.resets, "rdma_wraps": self.rdma.wraps,
            "bandwidth_probes": [{"peer": r.peer, "bytes_s": r.bytes_s, "bytes": r.nbytes}
                                 for r in self.bandwidth_results],
            "bandwidth_errors": self.bandwidth_errors,
            "failed_tasks": [f.name for f in self.failures],
        }


async def run_agents(settings: list[AgentSettings], topology: Topology | None,
                     seconds: float) -> list[dict[str, Any]]:
    """Run several agents as tasks of this process for ``seconds``; returns their stats.

    For benchmarks and tests that want many agents cheaply (one event loop, real sockets,
    real Redis). Each agent still binds its own address and publishes to its own stream.
    """
    async with contextlib.AsyncExitStack() as stack:
        agents = [await stack.enter_async_context(Agent(s, topology)) for s in settings]
        await asyncio.sleep(seconds)
        return [a.stats() for a in agents]
