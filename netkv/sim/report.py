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
    decode_part = (result.ttft_s - (result.queue_s + result.transfer_s))
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
        "predicted_ttft_mean_s": float(np.nanmean(pred)),
        "post_prefill_mean_s": float(np.nanmean(decode_part)),
        "wall_s": result.wall_s,
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The comparison table printed by ``netkv sim``."""
    head = (f"{'policy':<16}{'mean':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'SLO%':>7}"
            f"{'TBT ms':>8}{'xfer ms':>8}{'dec p50/p99 us':>16}   KV GB host/leaf/pod/core")
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        kv = "/".join(f"{s['kv_bytes_by_tier'][t] / 1e9:.0f}" for t in TIERS)
        lines.append(
            f"{name:<16}{s['ttft_mean_s']:>8.3f}{s['ttft_p50_s']:>8.3f}{s['ttft_p90_s']:>8.3f}"
            f"{s['ttft_p99_s']:>8.3f}{100 * s['slo_attainment']:>7.1f}"
            f"{1e3 * s['tbt_mean_s']:>8.1f}{1e3 * s['transfer_mean_s']:>8.1f}"
            f"{s['decision_p50_us']:>8.0f}/{s['decision_p99_us']:<7.0f}   {kv}")
    lines.append("TTFT in seconds; SLO% = TTFT within the scenario's SLO and mean TBT within "
                 "its threshold.")
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
    """TTFT CDF per policy (log-scaled time axis)."""
    fig = Figure(figsize=(7.0, 4.2), dpi=120)
    ax = fig.add_subplot()
    for r in results:
        t = np.sort(r.ttft_s[np.isfinite(r.ttft_s)])
        ax.plot(t, np.arange(1, t.shape[0] + 1) / t.shape[0], label=r.name, lw=1.4)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def sweep_plot(path: Path, kind: str, *, xlabel: str, values: Sequence[float],
               series: dict[str, list[float]], ylabel: str, log_x: bool = False) -> None:
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.add_subplot()
    for name, ys in series.items():
        ax.plot(values, ys, marker="o", label=name, lw=1.4)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"sweep: {kind}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
