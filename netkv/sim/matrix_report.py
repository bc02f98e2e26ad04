"""The matrix as markdown tables and one plot (see :mod:`netkv.sim.matrix`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def _ci(cell: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    return f"{scale * cell['mean']:.{digits}f} ± {scale * cell['ci95']:.{digits}f}"


def _vs(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    m, p, s = (entry["ttft_mean_reduction_pct"], entry["ttft_p99_reduction_pct"],
               entry["slo_points"])
    return (f"{m['mean']:+.2f} ± {m['ci95']:.2f}% / {p['mean']:+.2f} ± {p['ci95']:.2f}% / "
            f"{s['mean']:+.2f} ± {s['ci95']:.2f} pt, **{entry['verdict_mean_ttft']}**")


def summary_table(report: dict[str, Any]) -> list[str]:
    lines = ["| scenario | best tuned baseline | netkv vs best baseline | vs netkv@static | "
             "vs round_robin |", "|---|---|---|---|---|"]
    for name, t in report["scenarios"].items():
        vs = t["netkv_vs"]
        lines.append(f"| {name} | {t['best_baseline']} | {_vs(vs.get('best_baseline'))} | "
                     f"{_vs(vs.get('static'))} | {_vs(vs.get('round_robin'))} |")
    lines.append("")
    lines.append("Cells: netkv's reduction of mean TTFT / of p99 TTFT / SLO-attainment points, "
                 "each the mean ± 95% CI of the per-seed paired difference (positive = netkv "
                 "better); the verdict (mean TTFT) is a win or loss only beyond the interval "
                 "and beyond 0.1%, else a tie.")
    return lines


def scenario_table(name: str, t: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", "", "| policy | mean TTFT (s) | p99 TTFT (s) | SLO (%) | "
             "KV ready -> 1st token (ms) |", "|---|---|---|---|---|"]
    for policy, cells in t["policies"].items():
        lines.append(f"| {policy} | {_ci(cells['ttft_mean_s'])} | "
                     f"{_ci(cells['ttft_p99_s'], digits=2)} | "
                     f"{_ci(cells['slo_attainment'], 100, 1)} | "
                     f"{_ci(cells['after_prefill_mean_s'], 1e3, 1)} |")
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    lines = ["# NetKV simulation matrix", "",
             f"Trace `{Path(report['trace']).name}`: tuned on {report['tune_requests']} "
             f"requests (slice {report['tune_slice']}), scored on {report['score_requests']} "
             f"(slice {report['score_slice']}), {report['seeds']} seeds per cell; "
             f"{report['wall_s']:.0f} s wall on {report['cpus']} CPUs with {report['jobs']} "
             f"jobs, load average {report['loadavg_start'][0]:.1f} -> "
             f"{report['loadavg_end'][0]:.1f}.", "", "## netkv against the others", ""]
    lines += summary_table(report)
    lines += ["", "## Headline (largest gains, with the scenario where each occurs)", ""]
    for key, h in report["headline"].items():
        lines.append(f"* {key} ({h['policy']}): {h['mean']:+.2f} ± {h['ci95']:.2f} "
                     f"in `{h['scenario']}`")
    lines += ["", "## Per scenario (mean ± 95% CI over seeds)", ""]
    for name, t in report["scenarios"].items():
        lines += scenario_table(name, t)
    sens = report.get("sensitivity")
    if sens:
        lines += [f"## Sensitivity of the headline scenario `{sens['scenario']}`", "",
                  "| setting | best baseline | netkv vs best baseline | vs netkv@static | "
                  "vs round_robin |", "|---|---|---|---|---|"]
        for knob, t in sens["rows"].items():
            vs = t["netkv_vs"]
            lines.append(f"| {knob} | {t['best_baseline']} | {_vs(vs.get('best_baseline'))} | "
                         f"{_vs(vs.get('static'))} | {_vs(vs.get('round_robin'))} |")
        lines.append("")
    lines += ["## Tuned baseline weights (tuning slice, objective mean TTFT)", ""]
    for name, tuned in report["tuned"].items():
        lines.append(f"* {name}: " + "; ".join(f"{p} {v}" for p, v in tuned.items()))
    return "\n".join(lines) + "\n"


def plot(path: Path, report: dict[str, Any]) -> None:
    """Mean-TTFT reduction against round-robin per scenario and policy, with 95% CIs (left),
    and netkv's against the best tuned baseline and netkv@static (right)."""
    names = list(report["scenarios"])
    policies = [p for p in next(iter(report["scenarios"].values()))["policies"]
                if p != "round_robin"]
    fig = Figure(figsize=(14.0, 5.0), dpi=110)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(names))
    width = 0.8 / max(len(policies), 1)
    for i, policy in enumerate(policies):
        vals, errs = [], []
        for name in names:
            cells = report["scenarios"][name]["policies"]
            rr = cells.get("round_robin", {}).get("ttft_mean_s")
            me = cells.get(policy, {}).get("ttft_mean_s")
            if rr is None or me is None:
                vals.append(np.nan)
                errs.append(0.0)
                continue
            vals.append(100.0 * (1.0 - me["mean"] / rr["mean"]))
            errs.append(100.0 * me["ci95"] / rr["mean"])
        left.bar(x + (i - len(policies) / 2) * width, vals, width, yerr=errs, label=policy,
                 capsize=1.5)
    left.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    left.set_ylabel("mean TTFT reduction vs round_robin (%)")
    left.axhline(0, color="black", lw=0.6)
    left.legend(fontsize=7, ncol=2)
    left.grid(True, axis="y", alpha=0.3)
    for j, (label, colour) in enumerate((("best_baseline", "tab:green"),
                                         ("static", "tab:purple"))):
        rows: list[dict[str, float]] = [
            report["scenarios"][n]["netkv_vs"].get(label, {}).get(
                "ttft_mean_reduction_pct", {"mean": np.nan, "ci95": 0.0}) for n in names]
        right.bar(x + (j - 0.5) * 0.4, [v["mean"] for v in rows], 0.4,
                  yerr=[v["ci95"] for v in rows], color=colour, capsize=2,
                  label=f"netkv vs {label.replace('_', ' ')}")
    right.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("netkv's mean TTFT reduction (%), paired by seed")
    right.axhline(0, color="black", lw=0.6)
    right.legend(fontsize=8)
    right.grid(True, axis="y", alpha=0.3)
    fig.suptitle("NetKV simulation matrix: mean TTFT, 95% CI over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
