"""Mooncake-format request traces (JSONL), read strictly.

One JSON object per line: ``timestamp`` (arrival, ms from start), ``input_length`` and
``output_length`` (tokens) and ``hash_ids`` (prefix block hashes, 512 tokens per block,
``len(hash_ids) == ceil(input_length / 512)``). Any deviation is an
:class:`~netkv.errors.InputError` naming ``file:line`` and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from netkv.core.prefix_cache import BLOCK_TOKENS as BLOCK_TOKENS  # noqa: PLC0414 (re-export)
from netkv.core.topology import FloatArray, IntArray
from netkv.errors import InputError

_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival; per-request arrays plus the block hashes."""

    path: str
    arrival_s: FloatArray
    input_tokens: IntArray
    output_tokens: IntArray
    hash_ids: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def scaled(self, rate_scale: float = 1.0, length_scale: float = 1.0) -> Trace:
        """Load and context knobs: arrivals compressed by ``rate_scale``; prompts stretched by
        ``length_scale`` (block ids are remapped deterministically, see below, so the
        prefix-sharing structure of the trace is preserved)."""
        if rate_scale <= 0 or length_scale <= 0:
            raise InputError("scale", "rate and length scales must be > 0")
        arrival = self.arrival_s / rate_scale
        if length_scale == 1.0:
            return Trace(self.path, arrival, self.input_tokens, self.output_tokens,
                         self.hash_ids)
        tokens = np.maximum(np.round(self.input_tokens * length_scale), 1).astype(np.int64)
        stride = math.ceil(length_scale) + 1
        hashes: list[tuple[int, ...]] = []
        for n, old in zip(tokens.tolist(), self.hash_ids, strict=True):
            blocks = -(-n // BLOCK_TOKENS)
            # New block i stands for original block j (the one it was stretched from, or the
            # last one it covers when shrinking) and its rank k within j's span, so requests
            # that shared a prefix still share the stretched prefix.
            ids: list[int] = []
            last_j, k = -1, 0
            for i in range(blocks):
                if length_scale >= 1.0:
                    j = min(int(i / length_scale), len(old) - 1)
                else:
                    j = min(max(int((i + 1) / length_scale) - 1, 0), len(old) - 1)
                k = k + 1 if j == last_j else 0
                last_j = j
                ids.append(old[j] * stride + k)
            hashes.append(tuple(ids))
        return Trace(self.path, arrival, tokens, self.output_tokens, tuple(hashes))

    def head(self, n: int) -> Trace:
        return Trace(self.path, self.arrival_s[:n], self.input_tokens[:n],
                     self.output_tokens[:n], self.hash_ids[:n])


def _int_field(obj: dict[str, object], name: str, where: str, minimum: int) -> int:
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: {name}", f"expected an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{where}: {name}", f"must be >= {minimum}, got {value}")
    return value


def parse_line(text: str, where: str) -> tuple[int, int, int, tuple[int, ...]]:
    """One trace record -> (timestamp ms, input tokens, output tokens, hash ids)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(where, f"not valid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise InputError(where, f"expected a JSON object, got {type(obj).__name__}")
    missing = [f for f in _FIELDS if f not in obj]
    if missing:
        raise InputError(f"{where}: {missing[0]}", "missing required field")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise InputError(f"{where}: {unknown[0]}", f"unknown field; known: {', '.join(_FIELDS)}")
    ts = _int_field(obj, "timestamp", where, 0)
    n_in = _int_field(obj, "input_length", where, 1)
    n_out = _int_field(obj, "output_length", where, 1)
    hashes = obj["hash_ids"]
    if not isinstance(hashes, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hashes):
        raise InputError(f"{where}: hash_ids", "expected a list of non-negative integers")
    if len(hashes) != math.ceil(n_in / BLOCK_TOKENS):
        raise InputError(f"{where}: hash_ids", f"has {len(hashes)} blocks, expected "
                         f"ceil(input_length / {BLOCK_TOKENS}) = {math.ceil(n_in / BLOCK_TOKENS)}")
    return ts, n_in, n_out, tuple(hashes)


def load_trace(path: str | Path, limit: int | None = None) -> Trace:
    """Read a trace file (blank lines allowed); arrivals are sorted, stably."""
    path = Path(path)
    ts: list[int] = []
    n_in: list[int] = []
    n_out: list[int] = []
    hashes: list[tuple[int, ...]] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise InputError(str(path), f"cannot read trace: {exc.strerror}") from None
    with handle:
        for lineno, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            t, i, o, h = parse_line(text, f"{path}:{lineno}")
            ts.append(t)
            n_in.append(i)
            n_out.append(o)
            hashes.append(h)
            if limit is not None and len(ts) >= limit:
                break
    if not ts:
        raise InputError(str(path), "trace has no requests")
    order = np.argsort(np.array(ts, dtype=np.int64), kind="stable")
    return Trace(
        str(path),
        np.array(ts, dtype=np.float64)[order] / 1000.0,
        np.array(n_in, dtype=np.int64)[order],
        np.array(n_out, dtype=np.int64)[order],
        tuple(hashes[k] for k in order.tolist()),
    )
