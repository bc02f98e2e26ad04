"""Where a request's TTFT went, from a router comparison's ``router-requests.jsonl``.

Measured (:func:`measured`, from the engines' own timestamps of each request, on the replay's
clock): ``leg1``, the client's send to the prefill engine's receipt (the client, the router's
first leg and its parsing); ``pqueue``, the wait for the prefill's FIFO; ``compute``; ``turn``,
the prefill's answer to the decode engine's receipt (the router between its two legs);
``kvwait``, the decode's receipt to the start of its KV pull; ``kv``; ``after``, the KV's
arrival to the first token at the client (decode slot, first step, the router's relay).
The prefill queues per instance (``pqueues``: requests, prompt tokens, mean wait, mean/max
number waiting) and the same receipts through other prefill rules (``pqueue*``) are
:mod:`netkv.testbed.prefillq`'s.
:func:`ceiling` is the best TTFT any router could reach by its decode choice alone: every
KV transfer at the healthy NIC rate, all else as measured.

Modelled (:func:`breakdown`, the earlier estimate; kept for comparison), per router the
mean of:
``queue``, the wait a FIFO prefill would give the router's own assignment (in arrival order,
with the engines' model: :class:`netkv.engine.model.EngineModel`'s prefill time of the
prompt tokens not in that prefill's prefix cache, replayed from the trace's block ids);
``compute``, that prefill time; ``hand``, the rest until the KV starts to move (the router's
two legs, the engines' overheads, and this model's error, which every router shares); ``kv``;
and ``after``, from the KV's arrival to the first token. A model, not a measurement: it says
which term differs between routers, not its exact size.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from netkv.core.prefix_cache import BLOCK_TOKENS
from netkv.engine.model import EngineModel
from netkv.sim.stats import t975
from netkv.testbed.prefillq import RULES, counterfactual, queues

NIC_GBPS = 400.0  # the default topology's NIC, before the testbed's --scale


def breakdown(trace: list[dict[str, Any]], outcomes: list[dict[str, Any]],
              model: EngineModel | None = None) -> dict[str, dict[str, float]]:
    """Per router, the mean of each term in ms (``n``: requests counted)."""
    model = model or EngineModel()
    by_router: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in outcomes:
        if o.get("error") is None and o.get("prefill"):
            by_router[o["router"]].append(o)
    out: dict[str, dict[str, float]] = {}
    for router, rows in by_router.items():
        rows.sort(key=lambda o: float(o["arrival_s"]))
        cache: dict[str, set[int]] = defaultdict(set)
        free: dict[str, float] = defaultdict(float)
        acc: dict[str, list[float]] = defaultdict(list)
        for o in rows:
            req = trace[int(str(o["request_id"]).lstrip("r"))]
            hashes, held = req["hash_ids"], cache[o["prefill"]]
            hit = 0
            while hit < len(hashes) and hashes[hit] in held:
                hit += 1
            held.update(hashes)
            compute = model.prefill_s(max(int(req["input_length"]) - hit * BLOCK_TOKENS, 0))
            begin = max(float(o["arrival_s"]), free[o["prefill"]])
            free[o["prefill"]] = begin + compute
            acc["ttft"].append(float(o["ttft_s"]))
            acc["queue"].append(begin - float(o["arrival_s"]))
            acc["compute"].append(compute)
            if o.get("kv_bytes"):
                start = float(o["transfer_start_s"])
                acc["hand"].append(start - begin - compute)
                acc["kv"].append(float(o["transfer_end_s"]) - start)
                acc["after"].append(float(o["first_token_s"]) - float(o["transfer_end_s"]))
        out[router] = {k: 1e3 * statistics.mean(v) for k, v in acc.items()}
        out[router]["n"] = float(len(rows))
    return out


MEASURED = (("leg1", "arrival_s", "prefill.received"),
            ("pqueue", "prefill.received", "prefill.compute_start"),
            ("compute", "prefill.compute_start", "prefill.compute_end"),
            ("turn", "prefill.answered", "decode.received"),
            ("kvwait", "decode.received", "decode.kv_start"),
            ("kv", "decode.kv_start", "decode.kv_end"),
            ("after", "decode.kv_end", "first_token_s"))


def _at(o: dict[str, Any], name: str) -> float | None:
    value = o.get(name) if name in o else o.get("phases", {}).get(name)
    return None if value is None else float(value)


def _completed_by_router(outcomes: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The requests that completed, grouped by router (in the order they came)."""
    by_router: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in outcomes:
        if o.get("error") is None:
            by_router[o["router"]].append(o)
    return by_router


def measured(outcomes: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per router, the mean of each measured term in ms over the requests that have both
    ends of it (``n``: completed requests)."""
    by_router = _completed_by_router(outcomes)
    out: dict[str, dict[str, float]] = {}
    for router, rows in by_router.items():
        terms: dict[str, float] = {"ttft": 1e3 * statistics.mean(float(o["ttft_s"])
                                                                 for o in rows)}
        for name, a, b in MEASURED:
            spans = [y - x for o in rows
                     if (x := _at(o, a)) is not None and (y := _at(o, b)) is not None]
            terms[name] = 1e3 * statistics.mean(spans) if spans else float("nan")
        terms["n"] = float(len(rows))
        out[router] = terms
    return out


def _p99(values: list[float]) -> float:
    """As the comparison's table computes it (numpy's linear interpolation)."""
    return float(np.percentile(values, 99))


def ceiling(outcomes: list[dict[str, Any]], nic_bytes_s: float
            ) -> dict[str, dict[str, float]]:
    """Per router: its TTFT mean and p99 (ms), and what they would be had every KV transfer
    of its run moved at ``nic_bytes_s`` (the healthy NIC rate, the fastest any path allows),
    everything else as measured (``ideal_*``), and with no KV time at all (``nokv_*``). The
    ratio ``ideal / actual`` bounds what any decode choice could gain on that replay."""
    by_router = _completed_by_router(outcomes)
    out: dict[str, dict[str, float]] = {}
    for router, rows in by_router.items():
        actual, ideal, nokv = [], [], []
        for o in rows:
            ttft = float(o["ttft_s"])
            kv = float(o["transfer_s"]) if o.get("kv_bytes") else 0.0
            best = float(o.get("kv_bytes") or 0) / nic_bytes_s
            actual.append(ttft)
            ideal.append(ttft - max(kv - best, 0.0))
            nokv.append(ttft - kv)
        out[router] = {"mean": 1e3 * statistics.mean(actual), "p99": 1e3 * _p99(actual),
                       "ideal_mean": 1e3 * statistics.mean(ideal),
                       "ideal_p99": 1e3 * _p99(ideal),
                       "nokv_mean": 1e3 * statistics.mean(nokv), "nokv_p99": 1e3 * _p99(nokv),
                       "kv_share": statistics.mean(a - b for a, b in zip(actual, nokv,
                                                                          strict=True))
                       / statistics.mean(actual)}
    return out


def map_reaction(series: list[list[Any]], start_s: float, end_s: float, host: str,
                 factor: float = 2.0) -> tuple[float | None, float | None]:
    """From the comparison's oracle samples (``router-map.json``: replay clock, version,
    {decode host: estimated seconds}; fault times on the same clock): seconds from the
    fault's start until the map first estimates ``host`` at least ``factor`` times the best
    other decode host, and from its end until it first no longer does (None: never seen)."""
    def slow(costs: dict[str, float]) -> bool:
        others = [v for h, v in costs.items() if h != host]
        return bool(others) and host in costs and costs[host] >= factor * min(others)
    seen = next((t - start_s for t, _, c in series if start_s <= t < end_s and slow(c)), None)
    gone = next((t - end_s for t, _, c in series if t >= end_s and not slow(c)), None)
    return seen, gone


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def table(dirs: list[Path]) -> str:
    """The README's table over several comparison runs of one fault (one run per slice):
    per router, TTFT mean = the mean of the runs' means +- the 95% CI half-width (t over
    the runs) and their range; p99, KV mean and the measured terms over all the runs'
    requests pooled; fault transfers summed; router CPU per replay averaged; and netkv's
    mean over this router's, run by run (the same slice and schedule), +- its 95% CI."""
    per: dict[str, list[dict[str, Any]]] = defaultdict(list)
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in dirs:
        summary = json.loads((d / "routers.json").read_text())["routers"]
        for router, s in summary.items():
            per[router].append(s)
        with (d / "router-requests.jsonl").open() as f:
            for line in f:
                o = json.loads(line)
                rows[o["router"]].append(o)
    lines = ["| router:policy | TTFT mean (95% CI; range) | netkv / this (paired) | TTFT p99 | "
             "KV mean | fault transfers | router CPU | leg1 | prefill queue | turn | KV | "
             "after |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    subject = per.get("netkv", [])
    for router, runs in per.items():
        ratios = [float(a["ttft_mean_s"]) / float(b["ttft_mean_s"])
                  for a, b in zip(subject, runs, strict=False)] if router != "netkv" else []
        if len(ratios) > 1:
            r_half = t975(len(ratios) - 1) * statistics.stdev(ratios) / len(ratios) ** 0.5
            paired = f"{statistics.mean(ratios):.2f}x +- {r_half:.2f}"
        else:
            paired = "-"
        means = [1e3 * float(r["ttft_mean_s"]) for r in runs]
        m = statistics.mean(means)
        half = (t975(len(means) - 1) * statistics.stdev(means) / len(means) ** 0.5) \
            if len(means) > 1 else float("nan")
        ok = [o for o in rows[router] if o.get("error") is None]
        p99 = 1e3 * _p99([float(o["ttft_s"]) for o in ok])
        kv = 1e3 * statistics.mean(float(o["transfer_s"]) for o in ok if o.get("kv_bytes"))
        terms = measured(ok)[router]
        fault = sum(int(r.get("faulty_link_transfers", 0)) for r in runs)
        cpu = statistics.mean(float(r.get("router_cpu_s", 0.0)) for r in runs)
        lines.append(f"| `{router}` | {m:.0f} +- {half:.0f} ({min(means):.0f}-{max(means):.0f})"
                     f" ms | {paired} | {p99:.0f} ms | {kv:.0f} ms | {fault} / {len(ok)} | "
                     f"{cpu:.2f} s | "
                     + " | ".join(f"{terms[k]:.0f}" for k in
                                  ("leg1", "pqueue", "turn", "kv", "after")) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    usage = "usage: python -m netkv.testbed.breakdown TRACE DIR... | --table DIR..."
    dirs = argv[1:]
    if not dirs:
        print(usage, file=sys.stderr)
        return 2
    wanted = "routers.json" if argv[0] == "--table" else "router-requests.jsonl"
    missing = [d for d in dirs if not (Path(d) / wanted).is_file()]
    if missing:
        print(f"netkv testbed breakdown: {missing[0]}: not a comparison's output directory "
              f"(no {wanted}); {usage}", file=sys.stderr)
        return 2
    if argv[0] == "--table":
        print(table([Path(d) for d in dirs]))
        return 0
    with open(argv[0]) as f:
        trace = [json.loads(line) for line in f]
    for d in argv[1:]:
        with (Path(d) / "router-requests.jsonl").open() as f:
            rows = [json.loads(line) for line in f]
        print(f"== {d}")
        for router, m in breakdown(trace, rows).items():
            terms = "  ".join(f"{k} {m.get(k, float('nan')):6.0f}"
                              for k in ("ttft", "queue", "compute", "hand", "kv", "after"))
            print(f"  modelled {router:<28} n={int(m['n']):>3}  {terms}")
        for router, m in measured(rows).items():
            terms = "  ".join(f"{k} {m[k]:6.0f}" for k in ("ttft", *(t for t, _, _ in MEASURED)))
            print(f"  measured {router:<28} n={int(m['n']):>3}  {terms}")
        for router, per in queues(rows).items():
            cells = "  ".join(f"{name} {int(q['n'])}x {q['tokens'] / 1e3:.0f}k "
                              f"{q['wait_ms']:.0f} ms ({q['mean_waiting']:.2f}/"
                              f"{q['max_waiting']:.0f})" for name, q in per.items())
            print(f"  pqueues  {router:<28} {cells}")
        ids = {f"r{i}": req.get("hash_ids", ()) for i, req in enumerate(trace)}
        for router, c in counterfactual(rows, ids).items():
            rules = "  ".join(f"{rule} {c[rule]:4.0f}" for rule in RULES)
            print(f"  pqueue*  {router:<28} measured {c['measured']:4.0f}  its receipts "
                  f"through: {rules} ms")
        summary = json.loads((Path(d) / "routers.json").read_text())
        meta = summary.get("testbed", {})
        maps = Path(d) / "router-map.json"
        series = json.loads(maps.read_text()) if maps.exists() else {}
        for router, run in summary.get("routers", {}).items():
            events = {e["action"]: e for e in run.get("fault_events", [])}
            if "apply" in events and "revert" in events and series.get(router):
                t0 = float(run.get("schedule_t0_s") or series[router][0][0])
                seen, gone = map_reaction(series[router], t0 + events["apply"]["at_s"],
                                          t0 + events["revert"]["at_s"],
                                          events["apply"]["host"])
                print(f"  map      {router:<28} fault seen after {_s(seen)}, its end after "
                      f"{_s(gone)}; reaction {run.get('reaction')}")
        nic = NIC_GBPS * 1e9 / 8 * float(meta.get("scale", 1e-4))
        for router, c in ceiling(rows, nic).items():
            print(f"  ceiling  {router:<28} mean {c['mean']:6.0f} -> {c['ideal_mean']:6.0f} "
                  f"({c['ideal_mean'] / c['mean']:.2f}x; no KV at all {c['nokv_mean']:6.0f}, "
                  f"{c['nokv_mean'] / c['mean']:.2f}x)  p99 {c['p99']:6.0f} -> "
                  f"{c['ideal_p99']:6.0f} ({c['ideal_p99'] / c['p99']:.2f}x)  "
                  f"KV share {100 * c['kv_share']:.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
