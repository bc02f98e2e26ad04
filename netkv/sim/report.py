"""Turning runs into the contract's outputs: a table, ``summary.json`` and TTFT CDF plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

from netkv.sim.simulation import RunResult

TIERS = ("host", "leaf", "pod", "core")


def summarise(result: RunResult, slo_tbt_s: float) -> dict[str, Any]:
    """Per-policy figures (seconds, microseconds, bytes); keys are part of the contract."""
    ttft = result.ttft_s
    done = np.isfinite(ttft)
    t = ttft[done]
    ttft_ok = ttft <= result.slo_ttft_s
    tbt_ok = np.nan_to_num(result.tbt_s, nan=np.inf) <= slo_tbt_s
    dec = result.decision_s * 1e6
    by_tier = np.bincount(result.tier[result.tier >= 0], weights=result.kv_bytes[result.tier >= 0],
                          minlength=4)
    count_tier = np.bincount(result.tier[result.tier >= 0], minlength=4)
    pred = result.predicted_ttft_s
    # What the decode choice controls: KV ready -> first token (queue + transfer + 1st step).
    after = result.ttft_s - result.prefill_s
    return {
        "requests": int(ttft.shape[0]),
        "completed": int((result.completions == 1).sum()),
        "ttft_mean_s": float(t.mean()),
        "ttft_p50_s": float(np.percentile(t, 50)),
        "ttft_p90_s": float(np.percentile(t, 90)),
        "ttft_p99_s": float(np.percentile(t, 99)),
        "slo_attainment": float((ttft_ok & tbt_ok).mean()),
        "ttft_slo_attainment": float(ttft_ok.mean()),
        "tbt_mean_s": float(np.nanmean(result.tbt_s)),
        "tbt_p99_s": float(np.nanpercentile(result.tbt_s, 99)),
        "transfer_mean_s": float(result.transfer_s.mean()),
        "transfer_p99_s": float(np.percentile(result.transfer_s, 99)),
        "decode_queue_mean_s": float(result.queue_s.mean()),
        "decision_p50_us": float(np.percentile(dec, 50)) if dec.size else math.nan,
        "decision_p99_us": float(np.percentile(dec, 99)) if dec.size else math.nan,
        "kv_bytes_by_tier": {name: float(v) for name, v in zip(TIERS, by_tier, strict=True)},
        "requests_by_tier": {name: int(v) for name, v in zip(TIERS, count_tier, strict=True)},
        "kv_bytes_total": float(result.kv_bytes.sum()),
        "prefill_mean_s": float(result.prefill_s.mean()),
        "after_prefill_mean_s": float(np.nanmean(after)),
        "after_prefill_p99_s": float(np.nanpercentile(after, 99)),
        "predicted_after_prefill_mean_s": float(np.nanmean(pred)),
        "wall_s": result.wall_s,
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The comparison table printed by ``netkv sim``."""
    head = (f"{'policy':<16}{'mean':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'SLO%':>7}"
            f"{'TBT ms':>8}{'post ms':>8}{'p99':>7}{'dec p50/p99 us':>16}"
            f"   KV GB host/leaf/pod/core")
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        kv = "/".join(f"{s['kv_bytes_by_tier'][t] / 1e9:.0f}" for t in TIERS)
        lines.append(
            f"{name:<16}{s['ttft_mean_s']:>8.3f}{s['ttft_p50_s']:>8.3f}{s['ttft_p90_s']:>8.3f}"
            f"{s['ttft_p99_s']:>8.3f}{100 * s['slo_attainment']:>7.1f}"
            f"{1e3 * s['tbt_mean_s']:>8.1f}{1e3 * s['after_prefill_mean_s']:>8.1f}"
            f"{1e3 * s['after_prefill_p99_s']:>7.0f}"
            f"{s['decision_p50_us']:>8.0f}/{s['decision_p99_us']:<7.0f}   {kv}")
    lines.append("TTFT in seconds; SLO% = TTFT within the scenario's SLO and mean TBT within "
                 "its threshold; post = KV ready at prefill -> first token (decode queue + "
                 "transfer + first step), the part the decode choice controls (mean, p99 ms).")
    return "\n".join(lines)


def comparisons(rows: dict[str, dict[str, Any]], subject: str = "netkv") -> dict[str, Any]:
    """How ``subject`` compares with every other policy (mean-TTFT reduction, SLO points)."""
    if subject not in rows:
        return {}
    me = rows[subject]
    out: dict[str, Any] = {}
    for name, s in rows.items():
        if name == subject:
            continue
        out[name] = {
            "ttft_mean_reduction_pct": 100.0 * (1.0 - me["ttft_mean_s"] / s["ttft_mean_s"]),
            "ttft_p99_reduction_pct": 100.0 * (1.0 - me["ttft_p99_s"] / s["ttft_p99_s"]),
            "slo_points": 100.0 * (me["slo_attainment"] - s["slo_attainment"]),
        }
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def cdf_plot(path: Path, results: Sequence[RunResult], title: str) -> None:
    """TTFT CDF per policy (left) and the CDF of the part the decode choice controls, KV
    ready -> first token (right); log-scaled time axes."""
    fig = Figure(figsize=(11.0, 4.2), dpi=120)
    left, right = fig.subplots(1, 2)
    for r in results:
        for ax, values in ((left, r.ttft_s), (right, (r.ttft_s - r.prefill_s) * 1e3)):
            t = np.sort(values[np.isfinite(values)])
            ax.plot(t, np.arange(1, t.shape[0] + 1) / t.shape[0], label=r.name, lw=1.3)
    left.set_xlabel("TTFT (s)")
    right.set_xlabel("KV ready at prefill -> first token (ms)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def sweep_plot(path: Path, kind: str, *, xlabel: str, values: Sequence[float],
               panels: dict[str, dict[str, list[float]]], log_x: bool = False) -> None:
    """One panel per metric (title -> policy -> values), side by side."""
    fig = Figure(figsize=(5.2 * len(panels), 4.0), dpi=120)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (ylabel, series) in zip(axes, panels.items(), strict=True):
        for name, ys in series.items():
            ax.plot(values, ys, marker="o", label=name, lw=1.4)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"sweep: {kind}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
