"""One router's replay in the peer comparison (:class:`RouterRun`) and what is made of it:
the reaction to the first fault, the printed table, and the files written."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netkv.testbed.engines import Outcome
from netkv.testbed.fabric import FabricPlan
from netkv.testbed.faults import FaultEvent, FaultSchedule
from netkv.testbed.routers import RouterSpec
from netkv.testbed.runner import PolicyResult


@dataclass
class RouterRun:
    """One router's replay: the per-request outcomes and what they add up to."""

    spec: RouterSpec
    result: PolicyResult
    faulty_crossings: int = 0  # transfers that crossed a degraded or failed link
    unclassified: int = 0  # completed requests whose prefill/decode pair is unknown
    recomputed: int = 0  # decoded with no KV transfer: the pull failed, the decode prefilled
    engine_kv_mean_s: float = float("nan")  # the decode engines' own histograms
    router_cpu_s: float = 0.0
    ready_after_s: float = 0.0
    schedule_t0_s: float = 0.0  # the fault and background schedule's zero, on the replay clock
    fault_events: list[FaultEvent] = field(default_factory=list)
    reaction: dict[str, float | None] = field(default_factory=dict)
    # (replay clock s, router CPU s, this replay process's CPU s), every CPU_SAMPLE_S
    cpu_series: list[tuple[float, float, float]] = field(default_factory=list)
    # what the control plane's map said during the replay: (replay clock s, map version,
    # {decode host: estimated seconds to move a mean-sized KV there from one prefill host})
    map_series: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        s = self.result.summary()
        s.update({"router": self.spec.kind, "policy": self.spec.policy,
                  "faulty_link_transfers": self.faulty_crossings,
                  "unclassified": self.unclassified,
                  "kv_pull_failed_recomputed": self.recomputed,
                  "engine_kv_transfer_mean_s": self.engine_kv_mean_s,
                  "router_cpu_s": round(self.router_cpu_s, 3),
                  "router_ready_after_s": round(self.ready_after_s, 3),
                  "schedule_t0_s": round(self.schedule_t0_s, 6),
                  "fault_events": [_event(e) for e in self.fault_events],
                  "reaction": self.reaction})
        return s


def _event(e: FaultEvent) -> dict[str, Any]:
    return {"kind": e.kind, "host": e.host, "action": e.action, "at_s": round(e.at_s, 3)}


def decided_at(o: Outcome) -> float:
    """When a request's KV started to move, or (no transfer: the pull failed and the decode
    recomputed) when it arrived."""
    return o.transfer_start_s if o.kv_bytes else o.arrival_s


def reaction(run: RouterRun, plan: FabricPlan, schedule: FaultSchedule,
             schedule_t0: float) -> dict[str, float | None]:
    """For the first fault: seconds from its start to the last transfer that still went to
    the faulty host during it (after that, every transfer avoided it; 0 when none did), and
    from its end to the first transfer to that host again (None when none came). Transfers
    happen only when requests do, so both are bounded below by the arrival spacing."""
    if not schedule.faults:
        return {}
    f = schedule.faults[0]
    t = plan.topology
    start, end = schedule_t0 + f.start_s, schedule_t0 + f.end_s
    hits = [decided_at(o) for o in run.result.outcomes
            if o.error is None and o.decode and t.instance(o.decode).host == f.host]
    during = [x for x in hits if start <= x < end]
    after = [x for x in hits if x >= end]
    return {"uses_before_fault": float(sum(x < start for x in hits)),
            "uses_during_fault": float(len(during)),
            "last_use_during_fault_s": (max(during) - start) if during else 0.0,
            "first_use_after_fault_s": (min(after) - end) if after else None}


def format_comparison(runs: dict[str, RouterRun]) -> str:
    head = (f"{'router:policy':<28}{'done':>5}{'err':>5}{'TTFT mean':>11}{'TTFT p99':>10}"
            f"{'KV mean':>9}{'KV p99':>9}{'KV eng':>8}{'hot':>5}{'fault':>6}{'recmp':>6}"
            f"{'unkn':>5}{'cpu s':>7}")
    lines = [head, "-" * len(head)]
    for label, run in runs.items():
        s = run.summary()
        lines.append(
            f"{label:<28}{s['completed']:>5}{s['errors']:>5}"
            f"{s['ttft_mean_s'] * 1e3:>9.0f}ms{s['ttft_p99_s'] * 1e3:>8.0f}ms"
            f"{s['transfer_mean_s'] * 1e3:>7.0f}ms{s['transfer_p99_s'] * 1e3:>7.0f}ms"
            f"{s['engine_kv_transfer_mean_s'] * 1e3:>6.0f}ms{s['hot_link_transfers']:>5}"
            f"{s['faulty_link_transfers']:>6}{s['kv_pull_failed_recomputed']:>6}"
            f"{s['unclassified']:>5}{s['router_cpu_s']:>7.2f}")
    return "\n".join(lines)


def write_comparison(out: Path, runs: dict[str, RouterRun], meta: dict[str, Any]) -> Path:
    """``out/routers.json`` (one summary per router) and ``out/router-requests.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "routers.json"
    path.write_text(json.dumps({"routers": {k: r.summary() for k, r in runs.items()},
                                "testbed": meta, "written": time.time()}, indent=2,
                               allow_nan=True, default=str))
    with (out / "router-requests.jsonl").open("w") as f:
        for label, run in runs.items():
            for o in run.result.outcomes:
                f.write(json.dumps({"router": label, **o.as_dict()}) + "\n")
    (out / "router-cpu.json").write_text(json.dumps(
        {label: run.cpu_series for label, run in runs.items()}))
    (out / "router-map.json").write_text(json.dumps(
        {label: run.map_series for label, run in runs.items()}))
    return path
