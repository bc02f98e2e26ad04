"""A seeded, Mooncake-format workload whose statistics follow the published conversation trace.

The project ships no trace (the Mooncake conversation trace is Apache-2.0 but is not ours to
vendor, and a user's clone has nothing beside it), so the main job and the tests run on this
embedded workload unless a real trace is given by path. What it reproduces, and the published
figures it is checked against (``tests/unit/test_workload_synth.py``; Mooncake FAST'25, Table 2,
and statistics counted from ``FAST25-release/traces/conversation_trace.jsonl``):

==============================  ======================  ==================================
statistic                        conversation trace      synthesised (checked tolerance)
==============================  ======================  ==================================
mean input tokens                12,035                  within 8%  (seeds 0-3: 11.3-12.1k)
median input tokens              6,909                   within 8%  (6.7-7.1k)
p99 input tokens                 85,400 (max 126,195)    within 15% (75-83k); 0.6% > 100k
mean output tokens               343                     within 5%  (344-351)
median output tokens             350                     within 8%  (332-340)
arrival rate                     3.40 requests/s         within 10% (3.16-3.57 at 2,000)
arrival buckets                  every 3,000 ms          distinct timestamps 3,000 ms apart
first block (system prompt)      hash 0 in every request same
prefix-block reuse (inf. cache)  36.6%                   within 3 points (35.2-38.4%)
follow-up turns (reuse > 1 blk)  38.7% of requests       within 4 points (35.4-36.8%)
==============================  ======================  ==================================

How it is built (each a modelling choice, stated): input lengths are log-normal with the log
mean and log standard deviation of the real trace (8.74, 1.20), clipped to [512, 128k]; each
3-second bucket holds a negative-binomial count with the real bucket mean (10.2) and standard
deviation (7.7); outputs are 8.5% very short answers (1-20 tokens, as in the trace) and
otherwise normal around 352 (sd 190) with a 2% long tail up to 2,000. A request is a follow-up
turn of an earlier, shorter request of a recent conversation with probability
:data:`FOLLOW_UP_P` (calibrated so that block reuse matches, not fitted to any policy); a
follow-up keeps every full block of its parent and appends new ones, which is what multi-turn
prefix reuse looks like in the trace. It does not model time-of-day rate changes or the
trace's cluster of ~900-token prompts.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import numpy as np

from netkv.core.topology import FloatArray, IntArray
from netkv.errors import InputError
from netkv.workload.trace import BLOCK_TOKENS, Trace

BUCKET_MS = 3000
LOG_INPUT_MEAN, LOG_INPUT_SD = 8.841, 1.060
MIN_INPUT, MAX_INPUT = BLOCK_TOKENS, 128 * 1024
BUCKET_MEAN, BUCKET_SD = 10.20, 7.69
FOLLOW_UP_P = 0.40
RECENT_REQUESTS = 256
DEFAULT_REQUESTS = 2000
DEFAULT_SEED = 0

# The published figures (see the module docstring) that the unit test compares against.
PUBLISHED = {"mean_input": 12035.0, "median_input": 6909.0, "p99_input": 85400.0,
             "mean_output": 343.0, "median_output": 350.0, "rate_per_s": 3.40,
             "reuse": 0.366, "follow_up": 0.387}


def _bucket_counts(rng: np.random.Generator, n: int) -> list[int]:
    """Requests per 3-second bucket: negative binomial with the trace's mean and sd."""
    var = BUCKET_SD ** 2
    r = BUCKET_MEAN ** 2 / (var - BUCKET_MEAN)
    p = r / (r + BUCKET_MEAN)
    counts: list[int] = []
    total = 0
    while total < n:
        c = int(rng.negative_binomial(r, p))
        counts.append(c)
        total += c
    return counts


def _outputs(rng: np.random.Generator, n: int) -> IntArray:
    kind = rng.random(n)
    body = np.clip(np.round(rng.normal(352.0, 190.0, n)), 21, 2000)
    short = rng.integers(1, 21, n)
    long_tail = rng.integers(800, 2001, n)
    out = np.where(kind < 0.085, short, np.where(kind > 0.98, long_tail, body))
    return out.astype(np.int64)


def synthesise(requests: int = DEFAULT_REQUESTS, seed: int = DEFAULT_SEED) -> Trace:
    """``requests`` requests of the conversation-like workload, reproducible from ``seed``."""
    if requests < 1:
        raise InputError("requests", f"must be >= 1, got {requests}")
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(LOG_INPUT_MEAN, LOG_INPUT_SD, requests)),
                      MIN_INPUT, MAX_INPUT).astype(np.int64)
    arrival_ms: list[int] = []
    for bucket, count in enumerate(_bucket_counts(rng, requests)):
        arrival_ms += [bucket * BUCKET_MS] * count
    arrival = np.array(arrival_ms[:requests], dtype=np.float64) / 1000.0
    next_id = 1  # hash 0 is the shared system-prompt block
    recent: deque[tuple[int, tuple[int, ...]]] = deque(maxlen=RECENT_REQUESTS)
    hashes: list[tuple[int, ...]] = []
    follow = rng.random(requests) < FOLLOW_UP_P
    for i in range(requests):
        n_in = int(lengths[i])
        blocks = math.ceil(n_in / BLOCK_TOKENS)
        prefix: tuple[int, ...] = (0,)
        if follow[i]:
            shorter = [h for n, h in recent if n < n_in and n >= BLOCK_TOKENS * 2]
            if shorter:
                parent = max(shorter, key=len)  # the conversation that grew into this one
                full = len(parent) if len(parent) < blocks else blocks - 1
                prefix = parent[:max(full - 1, 1)]  # the parent's last block was partial
        ids = list(prefix[:blocks])
        while len(ids) < blocks:
            ids.append(next_id)
            next_id += 1
        hashes.append(tuple(ids))
        recent.append((n_in, tuple(ids)))
    return Trace(f"synthetic:seed={seed},requests={requests}", arrival, lengths,
                 _outputs(rng, requests), tuple(hashes))


def statistics(trace: Trace) -> dict[str, float]:
    """The statistics the docstring's table lists, computed the same way for any trace."""
    inp: IntArray = trace.input_tokens
    out: IntArray = trace.output_tokens
    span = float(trace.arrival_s[-1] - trace.arrival_s[0])
    seen: set[int] = set()
    hit = total = follow_ups = 0
    for ids in trace.hash_ids:
        reused = 0
        for h in ids:
            if h not in seen:
                break
            reused += 1
        follow_ups += reused > 1
        hit += sum(h in seen for h in ids)
        total += len(ids)
        seen.update(ids)
    arrival: FloatArray = trace.arrival_s
    return {"requests": float(len(trace)), "mean_input": float(inp.mean()),
            "median_input": float(np.median(inp)), "p99_input": float(np.percentile(inp, 99)),
            "max_input": float(inp.max()), "over_100k": float((inp > 100_000).sum()),
            "mean_output": float(out.mean()), "median_output": float(np.median(out)),
            "rate_per_s": len(trace) / span if span > 0 else 0.0,
            "min_gap_ms": float(np.diff(np.unique(np.round(arrival * 1000))).min())
            if len(np.unique(arrival)) > 1 else 0.0,
            "first_block_0": float(np.mean([ids[0] == 0 for ids in trace.hash_ids])),
            "reuse": hit / total if total else 0.0, "follow_up": follow_ups / len(trace)}


def write_trace(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` as Mooncake-format JSONL (readable by :func:`load_trace`)."""
    lines = []
    for t, n_in, n_out, ids in zip(trace.arrival_s.tolist(), trace.input_tokens.tolist(),
                                   trace.output_tokens.tolist(), trace.hash_ids, strict=True):
        lines.append(json.dumps({"timestamp": round(t * 1000), "input_length": n_in,
                                 "output_length": n_out, "hash_ids": list(ids)}))
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


__all__ = ["PUBLISHED", "statistics", "synthesise", "write_trace"]
