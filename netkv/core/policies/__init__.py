"""Decode-selection policies: plugins chosen by name, shared by the scheduler service, the
simulator and the testbeds.

Interface (stable; other packages build on it)
----------------------------------------------
* Build a :class:`RequestView` (prefill host index, prompt tokens, KV bytes per token,
  per-candidate ``overlap_blocks`` for delta transfer, ``output_tokens`` to reserve, and for
  the joint policy a :class:`PrefillView`) and a :class:`CandidateView` (arrays over decode
  instances: host index, running, waiting, KV-use fraction, KV capacity in tokens, optional
  current time per token ``tbt_s`` and queued tokens ``waiting_tokens``).
* ``policy = make_policy(name, params)`` (``policy_names()`` lists them; unknown names or
  params raise :class:`~netkv.errors.InputError` naming them). Each policy parses its own
  params strictly (``netkv.fields.from_mapping``) and has defaults for all of them.
* ``policy.decide(request, candidates, oracle, bookings=None) -> Decision``: pure,
  synchronous, numpy-vectorised, O(|D|) (``netkv_pair``: O(|P| |D|)). ``oracle`` is any
  :class:`~netkv.core.costmodel.CostOracle`; ``bookings`` (:class:`Bookings`) holds the caller's
  in-flight transfers per directed link. The :class:`Decision` has the chosen index into the
  candidates, predicted ``ttft_s`` with ``queue_s``/``transfer_s``/``first_token_s``, the
  tier, the bytes to move, the prefill index (joint choice) and optionally per-candidate
  ``scores`` (lower is better).
* :class:`DecisionEngine` wraps a policy for services and the simulator: it times every
  decision (``percentiles_us``) and owns the bookings (``reserve`` after a decision when the
  transfer starts, ``release`` when it lands).

Tiers (from :mod:`netkv.core.topology`): 0 same host, 1 same leaf, 2 same pod, 3 across the
core. ``llmd_weighted`` maps them to llm-d's host / rack / zone / region curve.
"""

from netkv.core.policies.base import DecodePolicy, TieBreaker
from netkv.core.policies.baselines import (
    LLMD_TOPOLOGY_CURVE,
    CacheAware,
    CacheLoad,
    DynamoDisagg,
    LeastLoaded,
    LlmdPrefillFirst,
    LlmdWeighted,
    PowerOfTwo,
    RoundRobin,
)
from netkv.core.policies.bookings import Booking, Bookings
from netkv.core.policies.engine import DecisionEngine
from netkv.core.policies.network import Netkv, NetkvPair
from netkv.core.policies.prediction import DecodeModel, Prediction, predict
from netkv.core.policies.registry import POLICIES, make_policy, policy_names
from netkv.core.policies.views import CandidateView, Decision, PrefillView, RequestView

__all__ = [
    "LLMD_TOPOLOGY_CURVE",
    "POLICIES",
    "Booking",
    "Bookings",
    "CacheAware",
    "CacheLoad",
    "CandidateView",
    "Decision",
    "DecisionEngine",
    "DecodeModel",
    "DecodePolicy",
    "DynamoDisagg",
    "LeastLoaded",
    "LlmdPrefillFirst",
    "LlmdWeighted",
    "Netkv",
    "NetkvPair",
    "PowerOfTwo",
    "Prediction",
    "PrefillView",
    "RequestView",
    "RoundRobin",
    "TieBreaker",
    "make_policy",
    "policy_names",
    "predict",
]
