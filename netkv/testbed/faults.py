"""Fault schedules for the namespace testbed: faults that no static label shows.

Three kinds, each applied at fixed offsets from the replay's start and reverted at its end,
so every router replays under exactly the same schedule:

* ``degraded_nic``: a host's NIC shaped to ``factor`` (default a quarter) of its rate, both
  directions (the host's ``eth0`` egress is ``<host>/nic/up``, the leaf port's egress
  ``<host>/nic/down``), as a NIC that negotiated a lower speed. The tbf rate is changed at run
  time (``tc qdisc change``); the agents report a tbf root rate as the NIC's capacity.
* ``link_down``: the host's ``eth0`` set down and up again (a failed rail and its recovery).
  Only the data interface fails: the host's management interface (agents, HTTP control)
  stays up, as a separate management network does in a real cluster.
* hot spots (:class:`~netkv.testbed.background.HotSpot`), run by
  :class:`~netkv.testbed.background.Background`; :func:`moving_hot_spot` makes one that moves.

Faults are emulation only: nothing tells the control plane about them. The agents' counters,
qdisc readings and probes must see them by themselves. Schedule file (YAML/JSON)::

    faults:
      - {kind: degraded_nic, host: h001, start_s: 5, end_s: 20, factor: 0.25}
      - {kind: link_down, host: h003, start_s: 10, end_s: 15}
    hot_spots:
      - {link: leaf0.1/up, start_s: 0, end_s: 10, flows: 6}

:class:`Faults` runs a schedule against a built fabric (an async context manager that reverts
whatever it applied on exit, also when cancelled) and keeps a log of when each change took
effect, so decision latencies can be measured against the moment the fabric changed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from netkv.errors import InputError
from netkv.fields import bound, from_mapping
from netkv.supervisor import Supervisor
from netkv.testbed.background import HotSpot, Schedule
from netkv.testbed.fabric import FabricPlan
from netkv.testbed.netns import LabError, Shaping

log = structlog.get_logger(__name__)

FaultKind = Literal["degraded_nic", "link_down"]
DATA_IF = "eth0"
COMMAND_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault on one host's data NIC from ``start_s`` to ``end_s`` (offsets in seconds)."""

    kind: FaultKind
    host: str = field(metadata={"nonempty": True})
    start_s: float = field(default=0.0, metadata=bound(ge=0))
    end_s: float = field(default=10.0, metadata=bound(gt=0))
    factor: float = field(default=0.25, metadata=bound(gt=0, lt=1))  # degraded_nic only

    def __post_init__(self) -> None:
        if self.end_s <= self.start_s:
            raise InputError("faults.end_s", "must be after start_s")

    @property
    def links(self) -> tuple[str, str]:
        """The topology links the fault touches (both directions of the host's NIC)."""
        return (f"{self.host}/nic/up", f"{self.host}/nic/down")

    def active(self, at_s: float) -> bool:
        return self.start_s <= at_s < self.end_s


@dataclass(frozen=True, slots=True)
class FaultSchedule:
    faults: tuple[Fault, ...] = ()
    hot_spots: tuple[HotSpot, ...] = ()

    @classmethod
    def parse(cls, data: Any, where: str = "schedule") -> FaultSchedule:
        try:
            return from_mapping(cls, data)
        except InputError as exc:
            raise InputError(f"{where}: {exc.where}", exc.message) from None

    def check(self, plan: FabricPlan) -> None:
        """Every fault names a host of the fabric; at most one fault per host at a time."""
        for i, f in enumerate(self.faults):
            if f.host not in plan.host_ns:
                raise InputError(f"faults[{i}].host", f"{f.host!r} is not a testbed host; "
                                 f"known: {', '.join(plan.host_ns)}")
            for j, g in enumerate(self.faults[:i]):
                if g.host == f.host and f.start_s < g.end_s and g.start_s < f.end_s:
                    raise InputError(f"faults[{i}]", f"overlaps faults[{j}] on {f.host}")

    @property
    def background(self) -> Schedule:
        return Schedule(self.hot_spots)

    @property
    def duration_s(self) -> float:
        return max([f.end_s for f in self.faults] + [self.background.duration_s], default=0.0)

    def faulty_links(self, at_s: float) -> set[str]:
        """Links degraded or down at offset ``at_s``."""
        return {link for f in self.faults if f.active(at_s) for link in f.links}

    def hot_links(self, at_s: float) -> set[str]:
        """Links a fault or a hot spot affects at offset ``at_s``."""
        return self.faulty_links(at_s) | self.background.links(at_s)

    def describe(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"kind": f.kind, "host": f.host, "start_s": f.start_s, "end_s": f.end_s,
             **({"factor": f.factor} if f.kind == "degraded_nic" else {})}
            for f in self.faults]
        out += [{"kind": "hot_spot", "link": h.link, "start_s": h.start_s, "end_s": h.end_s,
                 "flows": h.flows} for h in self.hot_spots]
        return out


# -- named schedules (the same for every router; offsets are fractions of the replay) ------
PRESETS = ("quiet", "degraded-nic", "failed-rail", "moving-hot-spot")


def decode_hosts(plan: FabricPlan) -> list[str]:
    """Hosts with a decode instance, in topology order."""
    t = plan.topology
    return list(dict.fromkeys(i.host for i in t.instances_with_role("decode")))


def preset(name: str, plan: FabricPlan, duration_s: float, *, host: str | None = None,
           flows: int = 12) -> FaultSchedule:
    """A named schedule over a replay of ``duration_s`` seconds.

    * ``quiet``: nothing (does NetKV cost anything when the network does not matter?);
    * ``degraded-nic``: a decode host's NIC at a quarter of its rate from 20% to 80% of the
      replay (default host: the first decode host in topology order, a fixed choice, not
      one picked for any router's sake);
    * ``failed-rail``: that host's link down from 30% to 70% of the replay, then back;
    * ``moving-hot-spot``: bulk flows on one leaf uplink, moving to the next leaf every
      quarter of the replay.
    """
    if duration_s <= 0:
        raise InputError("duration_s", "must be > 0")
    target = host or decode_hosts(plan)[0]
    if name == "quiet":
        schedule = FaultSchedule()
    elif name == "degraded-nic":
        schedule = FaultSchedule((Fault("degraded_nic", target, 0.2 * duration_s,
                                        0.8 * duration_s),))
    elif name == "failed-rail":
        schedule = FaultSchedule((Fault("link_down", target, 0.3 * duration_s,
                                        0.7 * duration_s),))
    elif name == "moving-hot-spot":
        schedule = FaultSchedule(hot_spots=moving_hot_spot(plan, duration_s, flows=flows))
    else:
        raise InputError("--faults", f"unknown schedule {name!r}; known: {', '.join(PRESETS)}")
    schedule.check(plan)
    return schedule


def moving_hot_spot(plan: FabricPlan, duration_s: float, *, steps: int = 4,
                    flows: int = 12) -> tuple[HotSpot, ...]:
    """A hot spot on one leaf uplink at a time, moving to the next leaf every
    ``duration_s / steps`` seconds."""
    leaves = [leaf for leaf in dict.fromkeys(h.leaf for h in plan.topology.hosts)
              if f"{leaf}/up" in plan.link_ports]
    if not leaves:
        raise InputError("topology", "no leaf uplink to put a hot spot on")
    step = duration_s / steps
    return tuple(HotSpot(f"{leaves[k % len(leaves)]}/up", k * step, (k + 1) * step, flows)
                 for k in range(steps))


# -- applying faults --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FaultEvent:
    """A change of the fabric: ``at_s`` is its offset from :meth:`Faults.start` on the
    runner's clock, ``wall_s`` the same moment in ``time.time()`` (to line up with the
    control plane's map timestamps)."""

    kind: str
    host: str
    action: Literal["apply", "revert"]
    at_s: float
    wall_s: float


async def _command(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise LabError(f"{' '.join(argv)}: no answer in {COMMAND_TIMEOUT_S:g}s") from None
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")


class Fabric:
    """The two run-time changes a fault needs, on a built fabric (``tc`` and ``ip``)."""

    def __init__(self, plan: FabricPlan) -> None:
        self.plan = plan

    async def set_rate(self, link: str, rate_bps: float) -> None:
        port = self.plan.link_port(link)
        s = Shaping.for_rate(rate_bps)
        await _command("tc", "-n", port.ns, "qdisc", "change", "dev", port.ifname, "root",
                       "tbf", "rate", f"{int(s.rate_bps)}bit", "burst", str(s.burst_bytes),
                       "limit", str(s.limit_bytes))

    async def set_link(self, host: str, up: bool) -> None:
        await _command("ip", "-n", self.plan.host_ns[host], "link", "set", "dev", DATA_IF,
                       "up" if up else "down")

    async def apply(self, fault: Fault) -> None:
        if fault.kind == "degraded_nic":
            for link in fault.links:
                await self.set_rate(link, self.plan.rate_bps(link) * fault.factor)
        else:
            await self.set_link(fault.host, up=False)

    async def revert(self, fault: Fault) -> None:
        if fault.kind == "degraded_nic":
            for link in fault.links:
                await self.set_rate(link, self.plan.rate_bps(link))
        else:
            await self.set_link(fault.host, up=True)


class Faults:
    """Runs a :class:`FaultSchedule`'s faults against a built fabric (hot spots are run by
    :class:`~netkv.testbed.background.Background`). Every fault applied is reverted on
    :meth:`stop` and on exit, whatever happened."""

    def __init__(self, plan: FabricPlan, schedule: FaultSchedule,
                 clock: Callable[[], float], fabric: Fabric | None = None) -> None:
        schedule.check(plan)
        self.plan, self.schedule, self.clock = plan, schedule, clock
        self.fabric = fabric or Fabric(plan)
        self.events: list[FaultEvent] = []
        self.errors: list[str] = []
        self._applied: dict[int, Fault] = {}
        # Each fault is a task that ends by itself; one that raises is logged and kept in
        # ``self._tasks.failures`` instead of vanishing.
        self._tasks = Supervisor("faults", stop_timeout_s=COMMAND_TIMEOUT_S)
        self._changed = asyncio.Event()
        self.start_time = 0.0  # on ``clock``; event offsets count from here

    async def __aenter__(self) -> Faults:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        """Start the schedule now (offsets count from this call)."""
        self.start_time = self.clock()
        for k, fault in enumerate(self.schedule.faults):
            self._tasks.spawn(self._run(k, fault), name=f"{fault.kind}-{k}", daemon=False)

    async def stop(self) -> None:
        """Cancel what has not happened yet and revert every fault still applied."""
        await self._tasks.stop()
        for k, fault in list(self._applied.items()):
            await self._revert(k, fault)

    async def wait_events(self, count: int, timeout_s: float) -> list[FaultEvent]:
        """The first ``count`` fabric changes, once they happened (bounded wait)."""
        async with asyncio.timeout(timeout_s):
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.events[:count]

    def offset(self) -> float:
        return self.clock() - self.start_time

    async def _run(self, k: int, fault: Fault) -> None:
        await asyncio.sleep(max(self.start_time + fault.start_s - self.clock(), 0.0))
        try:
            self._applied[k] = fault  # before the change: a cancel mid-way still reverts
            await self.fabric.apply(fault)
            self._event(fault, "apply")
            await asyncio.sleep(max(self.start_time + fault.end_s - self.clock(), 0.0))
        except LabError as exc:
            self.errors.append(str(exc))
            log.warning("fault.apply_failed", kind=fault.kind, host=fault.host, error=str(exc))
        await self._revert(k, fault)

    async def _revert(self, k: int, fault: Fault) -> None:
        """Undo one fault; it stays in ``_applied`` until the change is made, so a revert
        that is cancelled half-way is made again by :meth:`stop` (both changes are
        idempotent)."""
        if k not in self._applied:
            return
        try:
            await self.fabric.revert(fault)
        except LabError as exc:
            self._applied.pop(k, None)
            self.errors.append(str(exc))
            log.error("fault.revert_failed", kind=fault.kind, host=fault.host, error=str(exc))
            return
        self._applied.pop(k, None)
        self._event(fault, "revert")

    def _event(self, fault: Fault, action: Literal["apply", "revert"]) -> None:
        event = FaultEvent(fault.kind, fault.host, action, self.offset(), time.time())
        self.events.append(event)
        self._changed.set()
        log.info("fault." + action, kind=fault.kind, host=fault.host, at_s=round(event.at_s, 3))


def first_after(times: Sequence[float], flags: Sequence[bool], t: float) -> float | None:
    """The first time at or after ``t`` whose flag is true (decision logs: "first decision
    that avoids the fault"); None when there is none."""
    best: float | None = None
    for when, ok in zip(times, flags, strict=True):
        if ok and when >= t and (best is None or when < best):
            best = when
    return best
