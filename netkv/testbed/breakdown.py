"""Where a request's TTFT went, from a router comparison's ``router-requests.jsonl``.

``python -m netkv.testbed.breakdown TRACE DIR...`` prints, per router, the mean of:
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

from netkv.engine.model import EngineModel

TRACE_BLOCK_TOKENS = 512


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
            compute = model.prefill_s(max(int(req["input_length"]) - hit * TRACE_BLOCK_TOKENS, 0))
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


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m netkv.testbed.breakdown TRACE DIR...", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        trace = [json.loads(line) for line in f]
    for d in argv[1:]:
        with (Path(d) / "router-requests.jsonl").open() as f:
            rows = [json.loads(line) for line in f]
        print(f"== {d}")
        for router, m in breakdown(trace, rows).items():
            terms = "  ".join(f"{k} {m.get(k, float('nan')):6.0f}"
                              for k in ("ttft", "queue", "compute", "hand", "kv", "after"))
            print(f"  {router:<28} n={int(m['n']):>3}  {terms}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
