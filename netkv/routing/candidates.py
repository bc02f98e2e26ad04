"""What every in-process router sets up around a decision (the scheduler's
:class:`~netkv.routing.selector.Selector` and the P/D proxy's placement):

* :class:`CandidateViews`: one :class:`~netkv.core.policies.CandidateView` kept across
  decisions while the candidates' arrays stay the same objects (their values change in
  place), so the policies' per-view caches (paths, oracle rows gathered for these hosts) live
  on; only the waiting counts (reported plus the router's own extra) are refreshed, in place;
* :func:`decision_engine`: the engine of one policy, the name checked with an error naming
  the setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from netkv.core.policies import Bookings, CandidateView, DecisionEngine, make_policy, policy_names
from netkv.core.topology import FloatArray, IntArray, Topology
from netkv.errors import InputError


class CandidateViews:
    """``views.get(host, running, waiting, kv_use, capacity_tokens, extra_waiting=...)``."""

    def __init__(self) -> None:
        self._view: CandidateView | None = None
        self._key: tuple[Any, ...] = ()

    def get(self, host: IntArray, running: IntArray, waiting: IntArray, kv_use: FloatArray,
            capacity_tokens: FloatArray, *, extra_waiting: IntArray) -> CandidateView:
        view, key = self._view, self._key
        if (view is None or host is not key[0] or running is not key[1] or waiting is not key[2]
                or kv_use is not key[3] or capacity_tokens is not key[4]
                or extra_waiting is not key[5]):
            view = self._view = CandidateView(
                host=host, running=running, waiting=waiting + extra_waiting, kv_use=kv_use,
                capacity_tokens=capacity_tokens)
            self._key = (host, running, waiting, kv_use, capacity_tokens, extra_waiting)
        else:
            np.add(waiting, extra_waiting, out=view.waiting)
        return view


def decision_engine(policy: str, params: Mapping[str, Any] | None, topology: Topology,
                    bookings: Bookings, *, setting: str) -> DecisionEngine:
    """The :class:`DecisionEngine` of ``policy`` (an :class:`InputError` naming ``setting``
    for an unknown name), booking on ``bookings``."""
    if policy not in policy_names():
        raise InputError(setting, f"unknown policy {policy!r}; known: "
                         f"{', '.join(policy_names())}")
    return DecisionEngine(make_policy(policy, params), topology, bookings=bookings)
