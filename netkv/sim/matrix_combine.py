"""``netkv sim matrix --combine A,B,...``: merge the per-seed cells of several matrix reports
(for example a run split across machines or resumed from a checkpoint) and recompute every
comparison, table and plot from the merged cells (:mod:`netkv.sim.matrix`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from netkv.errors import InputError
from netkv.sim.matrix import BASELINES, NETKV, SCENARIOS, compare, headline, load_report
from netkv.sim.matrix_report import markdown, plot
from netkv.sim.report import write_json


def combine(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge the per-seed cells of several matrix reports (later reports win per scenario
    and policy) and recompute every comparison from the merged cells."""
    cells: dict[str, dict[str, list[dict[str, float]]]] = {}
    tuned: dict[str, dict[str, dict[str, Any]]] = {}
    sens_cells: dict[str, dict[str, list[dict[str, float]]]] = {}
    sens_name: str | None = None
    for rep in reports:
        if "cells" not in rep:
            raise InputError("--combine", "a report without per-seed 'cells' (older format)")
        for name, by_policy in rep["cells"].items():
            cells.setdefault(name, {}).update(by_policy)
        for name, weights in rep["tuned"].items():
            tuned.setdefault(name, {}).update(weights)
        sens = rep.get("sensitivity")
        if sens and "cells" in sens:
            if sens_name not in (None, sens["scenario"]):
                sens_cells = {}
            sens_name = sens["scenario"]
            for knob, by_policy in sens["cells"].items():
                sens_cells.setdefault(knob, {}).update(by_policy)
    known = {n: i for i, n in enumerate(SCENARIOS)}
    cells = dict(sorted(cells.items(), key=lambda kv: known.get(kv[0], len(known))))
    order = [p for p in BASELINES + NETKV if any(p in c for c in cells.values())]
    cells = {n: {p: c[p] for p in order + sorted(set(c) - set(order)) if p in c}
             for n, c in cells.items()}
    tables = {name: compare(c) for name, c in cells.items()}
    sensitivity_out = None if sens_name is None else {
        "scenario": sens_name, "rows": {k: compare(v) for k, v in sens_cells.items()},
        "cells": sens_cells}
    return {"tuned": {n: tuned.get(n, {}) for n in cells}, "cells": cells,
            "scenarios": tables, "headline": headline(tables), "sensitivity": sensitivity_out}


def run_combine(args: argparse.Namespace) -> int:
    paths = [p.strip() for p in args.combine.split(",") if p.strip()]
    reports = [load_report(p, "--combine") for p in paths]
    merged = combine(reports)
    last = reports[-1]
    # Run metadata from the last report that has it (a partial checkpoint has none).
    report: dict[str, Any] = {
        key: next((r[key] for r in reversed(reports) if r.get(key) is not None), None)
        for key in ("trace", "tune_slice", "score_slice", "tune_requests", "score_requests",
                    "seeds", "jobs", "cpus")}
    for key in ("trace", "tune_slice", "score_slice", "tune_requests", "score_requests",
                "seeds", "jobs", "cpus"):
        if report[key] is None:
            raise InputError("--combine", f"no report in {paths} records {key!r} (only "
                             "partial checkpoints?); include one finished matrix.json")
    report.update(merged)
    report["combined_from"] = paths
    report["wall_s"] = sum(float(r.get("wall_s", 0.0)) for r in reports)
    report["loadavg_start"] = reports[0].get("loadavg_start", [0.0, 0.0, 0.0])
    report["loadavg_end"] = last.get("loadavg_end", [0.0, 0.0, 0.0])
    report["scenario_descriptions"] = {
        n: d for r in reports for n, d in r.get("scenario_descriptions", {}).items()}
    out = Path(args.out)
    write_json(out / "matrix.json", report)
    text = markdown(report)
    (out / "matrix.md").write_text(text, encoding="utf-8")
    plot(out / "matrix.png", report)
    print(text)
    print(f"combined {len(paths)} reports into {out / 'matrix.json'}, .md and .png")
    return 0
