"""The prefill queues of a router comparison: measured per prefill instance, and the same
receipts through other prefill rules.

:func:`queues` reads the engines' own timestamps (``router-requests.jsonl``): per router and
prefill instance, the requests it served, their prompt tokens, the mean FIFO wait, and the
number of requests waiting (received, compute not begun) over time: its time-weighted mean
over the router's replay and its maximum.

:func:`counterfactual` asks whether a router's prefill *rule* or the *arrivals* it produced
made its queue: it replays the requests as that router's prefills received them (measured
times, prompt sizes and the trace's block ids) through round-robin, through
``netkv proxy``'s :class:`~netkv_proxy.prefill.PrefillChooser` without its drain (no measured
rate: booked work only, the rule before 2026-12-01) and with it, on the engines' model (one
prefill at a time, first come first served, cached prefix blocks matched on receipt and
inserted when the prefill is done, :class:`netkv.engine.model.EngineModel`'s time). Each
choice is made at the request's receipt and each answer reaches the rule 2 ms after its
prefill ends. A model of the queue, not a measurement: it compares rules on equal arrivals.
"""

from __future__ import annotations

import heapq
import itertools
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from netkv_proxy.config import WorkerEntry
from netkv_proxy.prefill import PrefillChoice, PrefillChooser
from netkv_proxy.workers import WorkerPool

from netkv.core.topology_file import parse_topology
from netkv.engine.model import EngineModel

BLOCK_TOKENS = 512  # the trace's block (as the comparison's engines hash prompts)
RULES = ("round_robin", "booked", "drained")
ANSWER_LAG_S = 0.002


def _times(o: dict[str, Any]) -> tuple[float, float] | None:
    ph = o.get("phases") or {}
    a, b = ph.get("prefill.received"), ph.get("prefill.compute_start")
    return None if a is None or b is None or not o.get("prefill") else (float(a), float(b))


def queues(outcomes: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per router, per prefill instance: ``n``, ``tokens``, ``wait_ms`` (mean), ``mean_waiting``
    (time-weighted over the router's span of receipts to last compute start) and
    ``max_waiting``; the router's ``all`` row pools its instances (``mean_waiting`` summed)."""
    by: dict[str, dict[str, list[tuple[float, float, int]]]] = defaultdict(
        lambda: defaultdict(list))
    for o in outcomes:
        t = _times(o)
        if o.get("error") is None and t is not None:
            by[o["router"]][o["prefill"]].append((*t, int(o.get("prompt_tokens", 0))))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for router, per in by.items():
        span0 = min(r for rows in per.values() for r, _, _ in rows)
        span1 = max(s for rows in per.values() for _, s, _ in rows)
        span = max(span1 - span0, 1e-9)
        table: dict[str, dict[str, float]] = {}
        for name, rows in sorted(per.items()):
            events = sorted([(r, 1) for r, _, _ in rows] + [(s, -1) for _, s, _ in rows])
            level = peak = 0
            area, last = 0.0, span0
            for at, step in events:
                area += level * (at - last)
                level, last = level + step, at
                peak = max(peak, level)
            table[name] = {"n": float(len(rows)), "tokens": float(sum(k for _, _, k in rows)),
                           "wait_ms": 1e3 * statistics.mean(s - r for r, s, _ in rows),
                           "mean_waiting": area / span, "max_waiting": float(peak)}
        everyone = [(r, s) for rows in per.values() for r, s, _ in rows]
        table["all"] = {"n": float(len(everyone)),
                        "tokens": sum(v["tokens"] for v in table.values()),
                        "wait_ms": 1e3 * statistics.mean(s - r for r, s in everyone),
                        "mean_waiting": sum(v["mean_waiting"] for v in table.values()),
                        "max_waiting": max(v["max_waiting"] for v in table.values())}
        out[router] = table
    return out


def _chooser(n: int, *, drain: bool) -> PrefillChooser:
    topology = parse_topology({
        "fabric": {"nic_gbps": 400, "leaf_oversubscription": 1, "pod_oversubscription": 1},
        "hosts": [{"name": f"h{i}", "leaf": "l0", "pod": "p0"} for i in range(n + 1)],
        "instances": [*({"name": f"p{i}", "role": "prefill", "host": f"h{i}"}
                        for i in range(n)),
                      {"name": "d0", "role": "decode", "host": f"h{n}"}]}, "counterfactual")
    pool = WorkerPool(tuple(WorkerEntry(url=f"http://127.0.0.1:{9000 + i}", host=f"p{i}")
                            for i in range(n)),
                      (WorkerEntry(url="http://127.0.0.1:9999", host="d0"),), topology,
                      eject_after=2, readmit_after=2)
    return PrefillChooser(pool, block_tokens=BLOCK_TOKENS, prefix_blocks=1_000_000,
                          drain=drain)


def replay(arrivals: Sequence[tuple[float, int, Sequence[int]]], n: int, rule: str,
           model: EngineModel | None = None) -> list[float]:
    """Each request's prefill wait (s) when ``arrivals`` (receipt time, prompt tokens, block
    ids; in time order) go through ``rule`` (one of :data:`RULES`) to ``n`` FIFO prefills."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    model = model or EngineModel()
    now = [0.0]
    chooser = _chooser(n, drain=rule == "drained")
    chooser.clock = lambda: now[0]
    cache: list[set[int]] = [set() for _ in range(n)]
    free = [float("-inf")] * n
    pending: list[tuple[float, int, int, PrefillChoice | None, Sequence[int]]] = []
    order, turn = itertools.count(), itertools.count()
    waits = []
    for at, tokens, hashes in arrivals:
        while pending and pending[0][0] <= at:
            now[0], _, w, choice, done = heapq.heappop(pending)
            cache[w].update(done)
            if choice is not None:
                chooser.release(choice)
                choice.worker.inflight -= 1
        now[0] = at
        choice = None
        if rule == "round_robin":
            w = next(turn) % n
        else:
            choice = chooser.choose(tokens, list(hashes), set())
            assert choice is not None
            w = choice.worker.index
            choice.worker.inflight += 1
        hit = 0
        while hit < len(hashes) and hashes[hit] in cache[w]:
            hit += 1
        begin = max(at, free[w])
        free[w] = begin + model.prefill_s(max(tokens - hit * BLOCK_TOKENS, 0))
        heapq.heappush(pending, (free[w] + ANSWER_LAG_S, next(order), w, choice, hashes))
        waits.append(begin - at)
    return waits


def counterfactual(outcomes: Sequence[dict[str, Any]], block_ids: dict[str, Sequence[int]],
                   model: EngineModel | None = None) -> dict[str, dict[str, float]]:
    """Per router: its measured mean prefill wait (``measured``) and the mean wait of its
    receipts through each of :data:`RULES` (ms). ``block_ids``: request id -> the trace's
    block ids (a request without them is replayed with none)."""
    by: dict[str, list[tuple[float, float, int, Sequence[int]]]] = defaultdict(list)
    prefills: set[str] = set()
    for o in outcomes:
        t = _times(o)
        if o.get("error") is None and t is not None:
            prefills.add(o["prefill"])
            by[o["router"]].append((*t, int(o["prompt_tokens"]),
                                    block_ids.get(str(o["request_id"]), ())))
    out: dict[str, dict[str, float]] = {}
    for router, rows in by.items():
        rows.sort(key=lambda r: r[0])
        arrivals = [(r, k, h) for r, _, k, h in rows]
        result = {"measured": 1e3 * statistics.mean(s - r for r, s, _, _ in rows)}
        for rule in RULES:
            result[rule] = 1e3 * statistics.mean(replay(arrivals, len(prefills), rule, model))
        out[router] = result
    return out
