"""Parameter sweeps and the baselines' grid search.

Sweeps vary one knob and rerun the chosen policies on the same trace:

* ``length``: ``--length-scale`` (context length; the paper's claim that ignoring the
  network gets worse as context grows), with the arrival rate divided by the same factor so
  that the offered prompt tokens per second stay constant;
* ``load``: ``--rate-scale``;
* ``staleness``: telemetry age ``s``: samples every ``s`` seconds, published ``s / 2``
  later (mean age ``s``), 0.1 s to 10 s;
* ``congestion``: background hot-spot intensity (multiplier on the hot fraction of links);
* ``dwell``: the tenants' hot-spot ON dwell median, 0.1 s to 5 minutes.

``tune`` grid-searches the baselines' weights (``cache_load``'s ``prefill_load_scale``,
``llmd_weighted``'s scorer weights, ``least_loaded``'s metric) on the same trace and reports
the best by mean TTFT.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from netkv.errors import InputError
from netkv.sim.report import summarise, sweep_plot, write_json
from netkv.sim.runs import run_all
from netkv.sim.scenario import Scenario
from netkv.sim.simulation import RunConfig, Simulation
from netkv.workload.trace import Trace

SWEEPS: dict[str, tuple[str, tuple[float, ...], bool]] = {
    "length": ("context length scale (x prompt lengths, / arrival rate)", (0.5, 1.0, 2.0, 4.0),
               True),
    "load": ("request rate scale (x trace arrival rate)", (0.5, 1.0, 1.5, 2.0), False),
    "staleness": ("telemetry age (s)", (0.1, 0.3, 1.0, 3.0, 10.0), True),
    "congestion": ("background hot-spot intensity", (0.0, 0.5, 1.0, 2.0, 4.0), False),
    "dwell": ("hot-spot ON dwell median (s)", (0.1, 1.0, 10.0, 30.0, 300.0), True),
}


def sweep(kind: str, scenario: Scenario, trace: Trace, configs: Sequence[RunConfig], *,
          values: Sequence[float] | None, out: Path, jobs: int,
          rate_scale: float, length_scale: float) -> dict[str, Any]:
    if kind not in SWEEPS:
        raise InputError("--sweep", f"unknown sweep {kind!r}; known: {', '.join(SWEEPS)}")
    xlabel, default, log_x = SWEEPS[kind]
    xs = tuple(values) if values else default
    sims: dict[Hashable, Simulation] = {}
    tasks: list[tuple[Hashable, RunConfig]] = []
    for x in xs:
        if kind == "length":
            # Arrivals slowed by the same factor, so offered prompt tokens per second stay put
            # and the sweep shows the transfer term growing, not prefill saturating.
            key: Hashable = ("length", x)
            sims[key] = Simulation(scenario, trace.scaled(rate_scale / x, length_scale * x))
        elif kind == "load":
            key = ("load", x)
            sims[key] = Simulation(scenario, trace.scaled(rate_scale * x, length_scale))
        else:
            key = "base"
            if key not in sims:
                sims[key] = Simulation(scenario, trace.scaled(rate_scale, length_scale))
        for base in configs:
            c = base
            if kind == "staleness":
                c = replace(base, telemetry_interval_s=x, telemetry_delay_s=x / 2)
            elif kind == "congestion":
                c = replace(base, congestion=x)
            elif kind == "dwell":
                median = scenario.spec.background.tenants.dwell_median_s
                c = replace(base, dwell_scale=x / median)
            tasks.append((key, c))
    results = run_all(sims, tasks, jobs)
    slo_tbt = scenario.spec.slo.tbt_s
    rows: list[dict[str, Any]] = []
    for (_, c), r, x in zip(tasks, results, [x for x in xs for _ in configs], strict=True):
        s = summarise(r, slo_tbt)
        rows.append({"value": x, "policy": c.name, **{k: s[k] for k in (
            "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "slo_attainment", "transfer_mean_s",
            "after_prefill_mean_s", "after_prefill_p99_s", "tbt_mean_s",
            "decision_p99_us")}})
    names = [c.name for c in configs]
    def series(key: str, scale: float = 1.0) -> dict[str, list[float]]:
        return {n: [scale * row[key] for row in rows if row["policy"] == n] for n in names}

    sweep_plot(out / f"sweep_{kind}.png", kind, xlabel=xlabel, values=xs, log_x=log_x,
               panels={"mean TTFT (s)": series("ttft_mean_s"),
                       "KV ready -> first token, mean (ms)": series("after_prefill_mean_s", 1e3),
                       "SLO attainment (%)": series("slo_attainment", 100.0)})
    data = {"sweep": kind, "xlabel": xlabel, "values": list(xs), "scenario": scenario.spec.name,
            "trace": trace.path, "rows": rows}
    write_json(out / f"sweep_{kind}.json", data)
    return data


def sweep_table(data: dict[str, Any]) -> str:
    rows = data["rows"]
    names = list(dict.fromkeys(r["policy"] for r in rows))
    head = f"{data['sweep']:>10} | " + " | ".join(f"{n:>26}" for n in names)
    lines = [f"sweep {data['sweep']}: {data['xlabel']}; cells: mean TTFT s / p99 s / SLO% / "
             "KV-ready-to-first-token mean ms",
             head, "-" * len(head)]
    for x in data["values"]:
        cells = []
        for n in names:
            r = next(r for r in rows if r["value"] == x and r["policy"] == n)
            post_ms = 1e3 * r["after_prefill_mean_s"]
            cells.append(f"{r['ttft_mean_s']:>6.3f}/{r['ttft_p99_s']:>6.2f}/"
                         f"{100 * r['slo_attainment']:>5.1f}/{post_ms:>5.0f}")
        lines.append(f"{x:>10g} | " + " | ".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


GRID: dict[str, list[dict[str, Any]]] = {
    "cache_load": [{"prefill_load_scale": w} for w in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)],
    "llmd_weighted": [
        {"queue_weight": q, "kv_weight": k, "prefix_weight": p, "topology_weight": t}
        for q, k, p, t in itertools.product((1.0, 2.0), (1.0, 2.0), (0.0, 3.0),
                                            (0.0, 1.0, 4.0))],
    "least_loaded": [{"metric": "requests"}, {"metric": "kv"}],
}


def tune(scenario: Scenario, trace: Trace, out: Path, jobs: int) -> dict[str, Any]:
    sims: dict[Hashable, Simulation] = {"base": Simulation(scenario, trace)}
    tasks: list[tuple[Hashable, RunConfig]] = []
    for policy, grid in GRID.items():
        for i, params in enumerate(grid):
            tasks.append(("base", RunConfig(policy, params, label=f"{policy}#{i}")))
    results = run_all(sims, tasks, jobs)
    slo_tbt = scenario.spec.slo.tbt_s
    report: dict[str, Any] = {"scenario": scenario.spec.name, "trace": trace.path,
                              "objective": "ttft_mean_s", "policies": {}}
    for policy in GRID:
        trials = []
        for (_, c), r in zip(tasks, results, strict=True):
            if c.policy == policy:
                s = summarise(r, slo_tbt)
                trials.append({"params": c.params, "ttft_mean_s": s["ttft_mean_s"],
                               "ttft_p99_s": s["ttft_p99_s"],
                               "slo_attainment": s["slo_attainment"]})
        best = min(trials, key=lambda t: t["ttft_mean_s"])
        report["policies"][policy] = {"best": best, "trials": trials}
    write_json(out / "tune.json", report)
    return report


def tune_table(report: dict[str, Any]) -> str:
    lines = ["grid search (objective: mean TTFT); best per policy marked *"]
    for policy, entry in report["policies"].items():
        for t in entry["trials"]:
            mark = "*" if t is entry["best"] or t == entry["best"] else " "
            lines.append(f"{mark} {policy:<14} {t['ttft_mean_s']:>7.3f} s  p99 "
                         f"{t['ttft_p99_s']:>7.2f} s  SLO {100 * t['slo_attainment']:5.1f}%  "
                         f"{t['params']}")
    return "\n".join(lines)
