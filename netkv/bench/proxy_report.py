"""The table `netkv bench proxy` prints from its JSON result (:mod:`netkv.bench.proxy`)."""

from __future__ import annotations

import math
from typing import Any


def print_result(r: dict[str, Any]) -> None:
    lat, closed = r["latency"], r["closed_loop"]
    pinned = r.get("pinned")
    where = ("proxy under test on CPU " + ",".join(map(str, pinned["proxy_under_test"]))
             + ", engine and generator on " + ",".join(map(str, pinned["engine_and_generator"]))
             if pinned else "not pinned")
    load = r.get("load_average")
    print(f"open loop at {r['rate']:g} req/s for {r['seconds']:g} s in {r['rounds']} "
          f"interleaved rounds, non-streaming; {where}"
          + (f"; prompts of {r['prompt_tokens']} token ids" if r.get("prompt_tokens") else "")
          + (f"; load average {load[0]:.2f}" if load else ""))
    if r.get("loop"):
        print(f"event loop: {r['loop']} in every process (engine, floor, proxy, load "
              "generator)" + (f"; netkv proxy's front: {r['front']}" if r.get("front") else ""))
    print(f"{'path':<8}{'p50':>9}{'p99':>9}{'added p50':>11}{'added p99':>11}"
          f"{'CPU/req':>10}{'max req/s':>11}{'CPU/req':>10}{'per chunk':>11}{'gen lag':>10}")
    print(f"{'':<8}{'':>9}{'':>9}{'':>11}{'':>11}{'at rate':>10}{'closed':>11}{'closed':>10}"
          f"{'':>11}{'p99':>10}")
    for k in ("direct", "direct2", "floor", "netkv"):
        proxied = k in ("floor", "netkv")
        added = (f"{lat[k]['added_p50_ms']:>9.2f}ms{lat[k]['added_p99_ms']:>9.2f}ms"
                 if proxied else f"{'':>11}{'':>11}")
        at_rate = lat[k].get("cpu_us_per_request")
        if k in closed:
            cpu = closed[k]["cpu_us_per_request"]
            top = (f"{closed[k]['rate']:>11.0f}"
                   f"{(f'{cpu:.0f}us' if not math.isnan(cpu) else '-'):>10}")
        else:
            top = f"{'-':>11}{'-':>10}"
        chunk = f"{r['stream_per_chunk_us'][k]:>9.1f}us" if proxied else f"{'':>11}"
        print(f"{k:<8}{lat[k]['p50_ms']:>7.2f}ms{lat[k]['p99_ms']:>7.2f}ms{added}"
              f"{(f'{at_rate:.0f}us' if at_rate is not None else '-'):>10}{top}{chunk}"
              f"{lat[k]['generator_lag_p99_ms']:>8.2f}ms")
    fixed = r["stream_per_chunk_us_with_fixed_cost"]
    print(f"per chunk: the slope over {r['stream_chunks']['short']} and "
          f"{r['stream_chunks']['long']}-chunk streams; with the fixed cost spread over the "
          f"long stream (the older figure): floor {fixed['floor']:.1f} us, netkv "
          f"{fixed['netkv']:.1f} us")
    n = lat["netkv"]
    st = n.get("proxy_stalls")
    if st:
        print(f"netkv's own stalls during its rounds: {st['late_3ms']:.0f} of {st['ticks']:.0f} "
              f"10 ms timer wake-ups late by > 3 ms; {st['gc']:.0f} GC passes, "
              f"{st['gc_1ms']:.0f} over 1 ms, {st['gc_s'] * 1e3:.1f} ms in all")
    print("direct: straight to the decode; direct2: the client sends both legs itself (no "
          f"proxy). netkv over direct2: added p50 {n['added_p50_vs_both_legs_ms']:.2f} ms, "
          f"p99 {n['added_p99_vs_both_legs_ms']:.2f} ms")
