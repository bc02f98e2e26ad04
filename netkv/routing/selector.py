"""A router's decision state and logic, free of HTTP: instances, bookings, prefix index,
map feed and one policy engine per policy name.

Shared by the scheduler service (behind its HTTP API) and any in-process router (the P/D
proxy): both build a :class:`Selector` from a :class:`SelectorConfig`, a topology and a
:class:`~netkv.routing.mapfeed.MapFeed`, and call :meth:`Selector.select` with a
:class:`~netkv.routing.requests.SelectRequest`. ``select`` is synchronous and does no I/O,
so a decision never waits for Redis or the broker; it reads the map the feed holds and the
loads the registry holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from netkv.core.policies import (
    Booking,
    Bookings,
    CandidateView,
    Decision,
    DecisionEngine,
    PrefillView,
    RequestView,
    make_policy,
    policy_names,
)
from netkv.core.prefix_cache import BLOCK_TOKENS
from netkv.core.topology import Topology
from netkv.errors import InputError
from netkv.routing.candidates import CandidateViews
from netkv.routing.fused import FusedNetkv
from netkv.routing.instances import InstanceInfo, InstanceRegistry, Load
from netkv.routing.mapfeed import MapFeed, MapView
from netkv.routing.prefixes import PrefixIndex
from netkv.routing.requests import InstanceReport, SelectRequest
from netkv.routing.reservations import Reservations


@dataclass(frozen=True, slots=True)
class SelectorConfig:
    """What a :class:`Selector` needs from a service's settings (plain values, no I/O).

    ``policy`` is the default policy; ``policy_params`` maps policy name -> its parameters;
    ``capacity_tokens`` is a decoder's KV memory until it reports one; ``prefix_blocks``
    bounds the prefix index (which is also never larger than the blocks the decoders' KV
    memory can hold: more could not be resident anyway); ``bytes_per_token`` is the KV size
    a transfer moves per prompt token; an open booking expires after ``reservation_ttl_s``.
    """

    bytes_per_token: float
    policy: str = "netkv"
    policy_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    capacity_tokens: float = 500_000.0
    prefix_blocks: int = 200_000
    reservation_ttl_s: float = 60.0
    max_registered: int = 256
    registration_ttl_s: float = 60.0
    scrape_allow: tuple[str, ...] = ()


@dataclass(slots=True)
class Choice:
    """A decision with what the answer reports about it (never changed once made; not frozen:
    a frozen init costs a microsecond or two per decision)."""

    decision: Decision
    decoder: InstanceInfo
    prefill: InstanceInfo  # the requested one, or the joint choice (netkv_pair)
    view: MapView
    policy: str
    reserved: bool
    duration_s: float


class Selector:
    """Everything a decision reads, owned in one place."""

    def __init__(self, settings: SelectorConfig, topology: Topology, feed: MapFeed,
                 clock: Callable[[], float] = time.time, *, fused: bool = True,
                 kernel: bool = True) -> None:
        """``fused`` (default) decides ``netkv`` with :class:`~netkv.routing.fused.FusedNetkv`
        (the same numbers in fewer calls; ``kernel``: in its C kernel where built); off,
        every decision goes through the policy's own ``decide``."""
        self.settings = settings
        self.topology = topology
        self.feed = feed
        self.clock = clock
        self.registry = InstanceRegistry(topology, settings.capacity_tokens,
                                         max_registered=settings.max_registered,
                                         ttl_s=settings.registration_ttl_s, clock=clock,
                                         scrape_allow=settings.scrape_allow)
        if not self.registry.decoders:
            raise InputError("topology", "no decode instances in the topology")
        self.reservations: Reservations[Booking] = Reservations(
            len(self.registry.decoders), settings.reservation_ttl_s, clock)
        resident = len(self.registry.decoders) * settings.capacity_tokens / BLOCK_TOKENS
        self.prefixes = PrefixIndex(min(settings.prefix_blocks, max(1024, int(resident))))
        self.bytes_per_token = settings.bytes_per_token
        self.bookings = Bookings(topology)
        self.engines: dict[str, DecisionEngine] = {}
        for name in policy_names():
            params: Mapping[str, Any] = settings.policy_params.get(name, {})
            # One ledger of in-flight transfers for all engines.
            self.engines[name] = DecisionEngine(make_policy(name, params), topology,
                                                bookings=self.bookings)
        unknown = set(settings.policy_params) - set(self.engines)
        if unknown:
            raise InputError(f"scheduler.policy_params.{sorted(unknown)[0]}", "unknown policy")
        if settings.policy not in self.engines:
            raise InputError("scheduler.policy", f"unknown policy {settings.policy!r}; "
                             f"known: {', '.join(self.engines)}")
        self.fused = {name: FusedNetkv(e, kernel=kernel) for name, e in self.engines.items()
                      if fused and FusedNetkv.applies(e)}
        self._swept_at = -1.0
        self._expiry_check_at = -1.0
        self._views = CandidateViews()

    @property
    def policies(self) -> tuple[str, ...]:
        return tuple(self.engines)

    # -- decisions ------------------------------------------------------------------------
    def sweep(self) -> None:
        """Hand back finished transfers and expired bookings (a select sweeps at most every
        20 ms first; the routing runtime's sweeper does it every second regardless)."""
        now = self.clock()
        self._swept_at = now
        for booking in self.reservations.sweep(now):
            self.bookings.release(booking)
        if now >= self._expiry_check_at:  # at most once a second
            self._expiry_check_at = now + 1.0
            expired = self.registry.expired(now)
            if expired:
                self.remove(expired)

    def remove(self, names: list[str]) -> list[str]:
        """Remove registered instances (their bookings end); returns the names removed."""
        known = [n for n in names if n in self.registry.by_name]
        mapping = self.registry.remove(known)
        if mapping is not None:
            for booking in self.reservations.remap(mapping):
                self.bookings.release(booking)
            self.prefixes.clear()
        return known

    def candidates(self) -> CandidateView:
        """The decoders as the policies see them: one view kept while the registry's and the
        bookings' arrays stay the same objects (their values change in place), so the
        policies' per-view caches (paths, oracle rows gathered for these hosts) live on;
        only the waiting counts (reported plus booked) are refreshed, in place."""
        reg = self.registry
        self.reservations.resize(len(reg.decoders))
        return self._views.get(reg.decode_host, reg.running, reg.waiting, reg.kv_use,
                               reg.capacity_tokens, extra_waiting=self.reservations.pending)

    def select(self, body: SelectRequest) -> Choice:
        """Decide for one request (and book it unless told not to).

        Raises :class:`~netkv.errors.InputError` naming the field (``body.prefill``,
        ``body.policy``) for an unknown instance or policy.
        """
        start = time.perf_counter()
        registry = self.registry
        prefill = registry.by_name.get(body.prefill)
        if prefill is None:
            prefill = registry.get(body.prefill, "body.prefill")  # raises, naming the field
        if prefill.role != "prefill":
            raise InputError("body.prefill", f"{prefill.name!r} is a decode instance")
        policy = body.policy or self.settings.policy
        engine = self.engines.get(policy)
        if engine is None:
            raise InputError("body.policy", f"must be one of {', '.join(self.engines)}, "
                             f"got {policy[:64]!r}")
        if not self.clock() - self._swept_at < 0.02:  # at most every 20 ms
            self.sweep()
        hashes = body.block_hashes
        runs = self.prefixes.runs(hashes) if hashes else None
        joint = None
        if policy == "netkv_pair":  # every prefill instance is a candidate, ready now
            prefills = registry.prefills
            joint = PrefillView(host=np.array([p.host_index for p in prefills], dtype=np.int64),
                                ready_s=np.zeros(len(prefills)))
        view = self.feed.view()
        candidates = self.candidates()
        fused = self.fused.get(policy) if joint is None else None
        decision = None if fused is None else fused.decide(
            candidates, view.oracle, prefill_host=prefill.host_index,
            prompt_tokens=body.prompt_tokens, output_tokens=body.output_tokens,
            kv_bytes_per_token=self.bytes_per_token, runs=runs, prefixes=self.prefixes,
            block_tokens=BLOCK_TOKENS, load_version=registry.load_version)
        if decision is None:
            overlap = None if runs is None else \
                self.prefixes.from_runs(runs, len(registry.decoders))
            request = RequestView(prefill_host=prefill.host_index,
                                  prompt_tokens=body.prompt_tokens,
                                  kv_bytes_per_token=self.bytes_per_token,
                                  overlap_blocks=overlap, block_tokens=BLOCK_TOKENS,
                                  output_tokens=body.output_tokens, prefill=joint)
            decision = engine.decide(request, candidates, view.oracle)
        decoder = registry.decoders[decision.index]
        if decision.prefill_index is not None:
            prefill = registry.prefills[decision.prefill_index]
        reserved = body.reserve
        if reserved:
            transfer = self.bookings.reserve(prefill.host_index, decoder.host_index,
                                             decision.transfer_bytes)
            _, old = self.reservations.book(body.request_id, decision.index,
                                            decision.transfer_s, transfer)
            if old is not None and old.transfer is not None:
                self.bookings.release(old.transfer)
            if hashes:
                self.prefixes.add(hashes, decision.index)
        return Choice(decision, decoder, prefill, view, policy, reserved,
                      time.perf_counter() - start)

    def release(self, request_id: str) -> InstanceInfo | None:
        res = self.reservations.release(request_id)
        if res is None:
            return None
        if res.transfer is not None:
            self.bookings.release(res.transfer)
            res.transfer = None
        return self.registry.decoders[res.decode]

    # -- instances ------------------------------------------------------------------------
    def register(self, body: InstanceReport) -> InstanceInfo:
        """Register an instance or refresh its load (fields left out keep their value)."""
        load = None
        if any(v is not None for v in (body.running, body.waiting, body.kv_use,
                                       body.capacity_tokens)):
            info = self.registry.by_name.get(body.name)
            current = self.registry.load_of(info) if info is not None else Load()
            load = Load(_given(body.running, current.running),
                        _given(body.waiting, current.waiting),
                        _given(body.kv_use, current.kv_use),
                        current.capacity_tokens if body.capacity_tokens is None
                        else body.capacity_tokens)
        info = self.registry.register(body.name, body.role, body.host, load, body.metrics_url)
        self.reservations.resize(len(self.registry.decoders))
        return info


def _given(value: float | None, current: float) -> float:
    return current if value is None else float(value)
