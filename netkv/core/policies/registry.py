"""Policies by name: the one place that maps config names to plugin classes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from netkv.core.policies.base import DecodePolicy
from netkv.core.policies.baselines import (
    CacheAware,
    CacheLoad,
    DynamoDisagg,
    LeastLoaded,
    LlmdPrefillFirst,
    LlmdWeighted,
    PowerOfTwo,
    RoundRobin,
)
from netkv.core.policies.network import Netkv, NetkvPair
from netkv.errors import InputError

Factory = Callable[[Mapping[str, Any] | None], DecodePolicy]

POLICIES: dict[str, Factory] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "cache_load": CacheLoad,
    "llmd_weighted": LlmdWeighted,
    "power_of_two": PowerOfTwo,
    "cache_aware": CacheAware,
    "dynamo_disagg": DynamoDisagg,
    "llmd_prefill_first": LlmdPrefillFirst,
    "netkv": Netkv,
    "netkv_pair": NetkvPair,
}


def policy_names() -> tuple[str, ...]:
    return tuple(POLICIES)


def make_policy(name: str, params: Mapping[str, Any] | None = None) -> DecodePolicy:
    """A fresh policy instance; unknown names or parameters are input errors naming them."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise InputError("policy", f"unknown policy {name!r}; known: "
                         f"{', '.join(POLICIES)}") from None
    return factory(params)
