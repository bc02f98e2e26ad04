"""Counter differencing: wraps, resets and saturation give the right rate or none at all."""

from __future__ import annotations

import pytest
from netkv_agent.counters import RateTracker, counter_delta

pytestmark = pytest.mark.unit


def test_delta_plain_increase() -> None:
    assert counter_delta(100, 350) == 250


def test_delta_32bit_wrap() -> None:
    top = (1 << 32) - 10
    assert counter_delta(top, 5, bits=32) == 15


def test_delta_64bit_wrap() -> None:
    assert counter_delta((1 << 64) - 1, 9, bits=64) == 10


def test_delta_reset_is_unknown() -> None:
    # From the middle of the range back to a small value: a reset, not a wrap.
    assert counter_delta(5_000_000, 1_000, bits=64) is None
    assert counter_delta(1 << 31, 10, bits=32) is None


def test_tracker_rates_and_window() -> None:
    t = RateTracker()
    assert t.update({"a": 0, "b": 10}, now=1.0) is None  # first reading is a baseline
    rates, window = t.update({"a": 500, "b": 10}, now=1.5) or ({}, 0.0)
    assert window == pytest.approx(0.5)
    assert rates == {"a": pytest.approx(1000.0), "b": 0.0}


def test_tracker_reset_drops_one_interval_then_rebaselines() -> None:
    t = RateTracker()
    t.update({"a": 10_000}, 0.0)
    t.update({"a": 20_000}, 1.0)
    assert t.update({"a": 50}, 2.0) is None
    assert t.resets == 1
    rates, _ = t.update({"a": 150}, 3.0) or ({}, 0.0)
    assert rates["a"] == pytest.approx(100.0)


def test_tracker_wrap_is_counted_and_rated() -> None:
    t = RateTracker(bits={"w": 32})
    t.update({"w": (1 << 32) - 100}, 0.0)
    rates, _ = t.update({"w": 100}, 2.0) or ({}, 0.0)
    assert rates["w"] == pytest.approx(100.0)
    assert t.wraps == 1 and t.resets == 0


def test_tracker_saturated_32bit_counter_gives_no_rate() -> None:
    top = (1 << 32) - 1
    t = RateTracker(bits={"s": 32})
    t.update({"s": top}, 0.0)
    assert t.update({"s": top}, 1.0) is None
    assert t.saturated == 1


def test_tracker_new_counter_spoils_one_interval() -> None:
    t = RateTracker()
    t.update({"a": 1}, 0.0)
    assert t.update({"a": 2, "b": 5}, 1.0) is None
    assert t.update({"a": 3, "b": 7}, 2.0) is not None


def test_tracker_ignores_non_advancing_clock() -> None:
    t = RateTracker()
    t.update({"a": 1}, 5.0)
    assert t.update({"a": 2}, 5.0) is None
