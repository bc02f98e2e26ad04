"""``netkv sim matrix --combine``: per-seed cells of separate runs merged, comparisons
recomputed from the merged cells (hand-worked numbers)."""

from __future__ import annotations

from typing import Any

import pytest

from netkv.errors import InputError
from netkv.sim.matrix_combine import combine

pytestmark = pytest.mark.unit


def rows(means: list[float]) -> list[dict[str, float]]:
    return [{"ttft_mean_s": m, "ttft_p99_s": 10 * m, "slo_attainment": 0.9,
             "after_prefill_mean_s": 0.08} for m in means]


def report(cells: dict[str, dict[str, list[dict[str, float]]]], **extra: Any) -> dict[str, Any]:
    return {"tuned": {n: {} for n in cells}, "cells": cells, **extra}


def test_baselines_and_netkv_from_two_runs_compare_paired() -> None:
    base = report({"s": {"round_robin": rows([2.0, 2.0, 2.0]),
                         "llmd_weighted": rows([1.0, 1.1, 1.2])}})
    mine = report({"s": {"netkv": rows([0.9, 1.0, 1.1]), "netkv@static": rows([1.0, 1.1, 1.2])}})
    out = combine([base, mine])
    t = out["scenarios"]["s"]
    assert list(t["policies"]) == ["round_robin", "llmd_weighted", "netkv@static", "netkv"]
    assert t["best_baseline"] == "llmd_weighted"
    vs = t["netkv_vs"]["best_baseline"]["ttft_mean_reduction_pct"]
    # Per seed: 10%, 9.09%, 8.33% lower than llm-d; mean 9.14%.
    assert vs["mean"] == pytest.approx((10 + 100 / 11 + 100 / 12) / 3, rel=1e-9)
    assert t["netkv_vs"]["round_robin"]["verdict_mean_ttft"] == "win"
    assert out["headline"]["round_robin.ttft_mean_reduction_pct"]["scenario"] == "s"


def test_later_reports_win_and_old_reports_are_refused() -> None:
    first = report({"s": {"round_robin": rows([2.0, 2.0]), "netkv": rows([1.9, 1.9])}})
    second = report({"s": {"netkv": rows([1.0, 1.0])}})
    t = combine([first, second])["scenarios"]["s"]
    assert t["policies"]["netkv"]["ttft_mean_s"]["mean"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="cells"):
        combine([{"tuned": {}, "scenarios": {}}])
