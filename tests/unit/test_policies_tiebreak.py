"""Hand-worked checks of ``netkv``'s tie-break toward the lower tier (``tie_rel``)."""

from __future__ import annotations

import numpy as np

from netkv.core.policies.base import TieBreaker
from netkv.core.policies.network import NetkvParams, prefer_lower_tier
from netkv.core.policies.registry import make_policy


def test_near_tie_goes_to_the_lower_tier() -> None:
    # Best: candidate 1 (tier 3, 0.100 s = 0.070 transfer + 0.030 first step).
    # Slack 0.1 x 0.070 = 0.007 s: candidate 0 (tier 1, 0.1015 s) is within it, candidate 2
    # (tier 0, 0.110 s) is not, so candidate 0 wins; candidate 3 (tier 1, 0.1060 s) is also
    # within, but 0 predicts less.
    scores = np.array([0.1015, 0.100, 0.110, 0.1060])
    transfer = np.array([0.0715, 0.070, 0.080, 0.0760])
    tier = np.array([1, 3, 0, 1])
    assert prefer_lower_tier(scores, transfer, tier, 1, tie_rel=0.1, ties=TieBreaker(0)) == 0


def test_beyond_the_slack_the_prediction_wins() -> None:
    # Slack 0.1 x 0.070 = 0.007 s; the tier-1 candidate predicts 0.0080 s more: not a tie.
    scores = np.array([0.108, 0.100])
    transfer = np.array([0.078, 0.070])
    tier = np.array([1, 3])
    assert prefer_lower_tier(scores, transfer, tier, 1, tie_rel=0.1, ties=TieBreaker(0)) == 1
    # And tie_rel = 0 (off) keeps the argmin even for a near tie.
    assert prefer_lower_tier(np.array([0.1001, 0.100]), transfer, tier, 1, tie_rel=0.0,
                             ties=TieBreaker(0)) == 1


def test_no_transfer_means_no_slack() -> None:
    # The best holds the whole prompt (transfer 0): nothing to be uncertain about.
    scores = np.array([0.0300001, 0.030])
    transfer = np.array([0.0000001, 0.0])
    tier = np.array([0, 2])
    assert prefer_lower_tier(scores, transfer, tier, 1, tie_rel=0.1, ties=TieBreaker(0)) == 1


def test_tie_rel_is_a_validated_param() -> None:
    assert NetkvParams().tie_rel == 0.1
    policy = make_policy("netkv", {"tie_rel": 0.0})
    assert policy.params.tie_rel == 0.0  # type: ignore[attr-defined]


def test_load_rule_takes_the_least_full_decoder_of_no_higher_tier() -> None:
    from netkv.core.policies.network import prefer_less_loaded

    # Best: candidate 1 (tier 2, 0.100 s, transfer 0.070): slack 0.007 s. Candidates 0
    # (tier 1, 0.1015 s, KV 60% used), 3 (tier 2, 0.1050 s, 20%) and 4 (tier 3, 0.1010 s,
    # 5%) are within it; 4 is of a higher tier than the best, so it is out; 3 is the least
    # full of the rest. Candidate 2 (0.110 s) is beyond the slack.
    scores = np.array([0.1015, 0.100, 0.110, 0.1050, 0.1010])
    transfer = np.array([0.0715, 0.070, 0.080, 0.0750, 0.0710])
    tier = np.array([1, 2, 0, 2, 3])
    kv_use = np.array([0.6, 0.5, 0.0, 0.2, 0.05])
    assert prefer_less_loaded(scores, transfer, tier, kv_use, 1, tie_rel=0.1,
                              ties=TieBreaker(0)) == 3
    # The old rule picks the lowest tier (candidate 0) instead.
    assert prefer_lower_tier(scores, transfer, tier, 1, tie_rel=0.1, ties=TieBreaker(0)) == 0
    # No slack without a transfer; alone within the slack, the best stays.
    assert prefer_less_loaded(scores, np.zeros(5), tier, kv_use, 1, tie_rel=0.1,
                              ties=TieBreaker(0)) == 1
    assert prefer_less_loaded(np.array([0.1, 0.2]), np.array([0.07, 0.07]),
                              np.array([1, 1]), np.array([0.9, 0.0]), 0, tie_rel=0.1,
                              ties=TieBreaker(0)) == 0
    assert NetkvParams().tie_rule == "load"
