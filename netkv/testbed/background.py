"""Background traffic: hot spots that move between leaf uplinks and core links, on a schedule.

A hot spot is a set of long-lived bulk TCP flows between *tenant* servers (other tenants'
machines on the switches, see :mod:`netkv.testbed.fabric`) chosen so that they cross exactly
the named switch link and no GPU host's NIC. The schedule is a pure value (start, end, link,
flows), so every policy replay runs under exactly the same one; flows start and stop at fixed
offsets from the replay's start and the whole schedule is bounded in time.

Schedule file (YAML/JSON)::

    hot_spots:
      - {start_s: 0, end_s: 30, link: pod0/up, flows: 6}
      - {start_s: 10, end_s: 20, link: leaf0.1/up, flows: 4}
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from netkv.errors import InputError
from netkv.fields import bound, from_mapping
from netkv.supervisor import Supervisor
from netkv.testbed.engines import CHUNK, connect_from, listening_socket
from netkv.testbed.fabric import FabricPlan

log = structlog.get_logger(__name__)
_BULK = bytes(CHUNK)


@dataclass(frozen=True, slots=True)
class HotSpot:
    """Bulk flows crossing ``link`` (a leaf or pod link name) from ``start_s`` to ``end_s``."""

    link: str = field(metadata={"nonempty": True})
    start_s: float = field(default=0.0, metadata=bound(ge=0))
    end_s: float = field(default=30.0, metadata=bound(gt=0))
    flows: int = field(default=6, metadata=bound(ge=1, le=64))

    def __post_init__(self) -> None:
        if self.end_s <= self.start_s:
            raise InputError("hot_spots.end_s", "must be after start_s")


@dataclass(frozen=True, slots=True)
class Schedule:
    hot_spots: tuple[HotSpot, ...] = ()

    @property
    def duration_s(self) -> float:
        return max((h.end_s for h in self.hot_spots), default=0.0)

    @classmethod
    def parse(cls, data: Any, where: str = "schedule") -> Schedule:
        try:
            return from_mapping(cls, data)
        except InputError as exc:
            raise InputError(f"{where}: {exc.where}", exc.message) from None

    def links(self, at_s: float) -> set[str]:
        """Links that are hot at offset ``at_s``."""
        return {h.link for h in self.hot_spots if h.start_s <= at_s < h.end_s}


def core_schedule(plan: FabricPlan, duration_s: float, flows: int = 12) -> Schedule:
    """The default schedule: both directions of every core link congested for the whole
    replay, and a leaf-uplink hot spot that moves to another leaf every third of it."""
    pods = list(dict.fromkeys(h.pod for h in plan.topology.hosts))
    leaves = list(dict.fromkeys(h.leaf for h in plan.topology.hosts))
    spots = [HotSpot(f"{pod}/{d}", 0.0, duration_s, flows) for pod in pods
             for d in ("up", "down") if f"{pod}/up" in plan.link_ports]
    third = duration_s / 3
    for k in range(3):
        leaf = leaves[(len(leaves) - 1 - k) % len(leaves)]
        spots.append(HotSpot(f"{leaf}/up", k * third, (k + 1) * third, max(flows // 2, 1)))
    return Schedule(tuple(spots))


def flow_endpoints(plan: FabricPlan, link: str) -> tuple[str, str]:
    """(source, sink) tenant switches whose path crosses exactly ``link``: for
    ``<leaf>/up`` the leaf's tenant sends to its pod's tenant; ``/down`` is the reverse."""
    name, _, direction = link.rpartition("/")
    parent = plan.parent(name)
    if link not in plan.link_ports or "/nic/" in link or parent is None \
            or direction not in ("up", "down"):
        raise InputError("hot_spots.link", f"{link!r} is not a leaf or pod link of the "
                         "testbed (e.g. leaf0.0/up, pod1/down)")
    return (name, parent) if direction == "up" else (parent, name)


class Background:
    """Runs a :class:`Schedule` against a built fabric; an async context manager that
    closes every flow on exit."""

    def __init__(self, plan: FabricPlan, schedule: Schedule,
                 clock: Callable[[], float]) -> None:
        self.plan, self.schedule, self.clock = plan, schedule, clock
        self.bytes_sent = 0
        self._servers: dict[str, asyncio.Server] = {}
        self._ports: dict[str, int] = {}
        self._tasks = Supervisor("background")  # one task per flow; each ends by itself
        self._sinks: dict[asyncio.Task[None] | None, asyncio.StreamWriter] = {}

    async def __aenter__(self) -> Background:
        for switch, ns in self.plan.tenant_ns.items():
            sock = listening_socket(ns, self.plan.tenant_addr[switch])
            self._ports[switch] = sock.getsockname()[1]
            self._servers[switch] = await asyncio.start_server(self._sink, sock=sock)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        for writer in self._sinks.values():  # end the sinks before the loop goes away
            writer.transport.abort()
        sinks = [t for t in self._sinks if t is not None]
        if sinks:
            await asyncio.wait(sinks, timeout=5.0)

    def start(self) -> None:
        """Start the schedule now (offsets count from this call)."""
        t0 = self.clock()
        for spot in self.schedule.hot_spots:
            src, dst = flow_endpoints(self.plan, spot.link)
            for _ in range(spot.flows):
                self._tasks.spawn(self._flow(t0, spot, src, dst), name=f"flow-{spot.link}",
                                  daemon=False)

    async def stop(self) -> None:
        await self._tasks.stop()

    async def _flow(self, t0: float, spot: HotSpot, src: str, dst: str) -> None:
        await asyncio.sleep(max(t0 + spot.start_s - self.clock(), 0.0))
        try:
            _, writer = await connect_from(self.plan.tenant_ns[src], self.plan.tenant_addr[dst],
                                           self._ports[dst])
        except (OSError, TimeoutError) as exc:
            log.warning("background.connect_failed", link=spot.link, error=str(exc))
            return
        try:
            async with asyncio.timeout(max(t0 + spot.end_s - self.clock(), 0.0)):
                while True:
                    writer.write(_BULK)
                    await writer.drain()
                    self.bytes_sent += len(_BULK)
        except (TimeoutError, OSError):
            pass
        finally:
            writer.transport.abort()

    @staticmethod
    async def _drain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read and discard until the peer goes away (a sink outside a Background)."""
        try:
            while await reader.read(CHUNK):
                pass
        except OSError:
            pass
        finally:
            writer.transport.abort()

    async def _sink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        self._sinks[me] = writer
        try:
            while await reader.read(CHUNK):
                pass
        except OSError:
            pass
        finally:
            self._sinks.pop(me, None)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def bulk(listen: tuple[str, int] | None, to: tuple[str, int] | None, flows: int,
               seconds: float) -> int:
    """A tenant server for the compose testbed: sink on ``listen`` and/or ``flows`` bulk TCP
    flows to ``to``, for ``seconds`` (bounded). Returns the bytes sent."""
    sent = 0
    server = None
    if listen is not None:
        sock = listening_socket(None, *listen)
        server = await asyncio.start_server(Background._drain, sock=sock)

    async def flow() -> None:
        nonlocal sent
        assert to is not None
        while True:  # the peer may not be up yet: retry until the deadline cancels us
            try:
                _, writer = await connect_from(None, *to)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.5)
                continue
            try:
                while True:
                    writer.write(_BULK)
                    await writer.drain()
                    sent += len(_BULK)
            except OSError:
                await asyncio.sleep(0.5)
            finally:
                writer.transport.abort()

    tasks = [asyncio.create_task(flow()) for _ in range(flows if to else 0)]
    try:
        await asyncio.sleep(seconds)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if server is not None:
            server.close()
    return sent
