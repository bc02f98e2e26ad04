"""Which prefill a request goes to: the one predicted to finish it first.

The prefill engines run one prefill at a time, first come first served, and skip the prompt
blocks already in their prefix cache (vLLM's automatic prefix caching). So the time until a
new prompt's prefill is done on worker ``w`` is the work queued ahead of it plus its own
uncached work. The proxy knows both first-hand for the traffic it sends:

* the prompts it has in flight to ``w`` and how many of their tokens it expected ``w`` to
  compute (tokens minus the prefix ``w`` was expected to hold), summed as ``w.prefill_work``;
* which prompt blocks it has itself sent to ``w`` (a :class:`PrefixIndex` over the prefill
  workers, as vllm-router's ``cache_aware`` keeps a radix tree per worker), hence how much of
  the new prompt ``w`` would skip.

Requests that reach ``w`` from elsewhere (another router) show only in the engine's gauges:
``running + waiting`` beyond what the proxy had in flight when that scrape was taken. Each
such request is counted as one of the new prompt's size (the proxy knows nothing better of
it). The score, in prompt tokens, is::

    work_w + external_w * tokens + (tokens - overlap_w * block) + overhead * (queued_w + 1)

``overhead`` is a prefill's fixed cost in tokens; it is a stated choice: one block of tokens
(``block_tokens``), not fitted to any testbed. All workers are assumed equally fast (one
model, one GPU type), so tokens rank them as seconds would. The lowest score wins; ties go in
turn. Compared with the shortest queue by request count (the proxy's first rule, and
``power_of_two``'s), a queue of one 12k-token prompt is no longer equal to a queue of one
1k-token prompt, and a count scraped before a burst drained does not hide an idle worker.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from netkv.routing.prefixes import PrefixIndex
from netkv_proxy.workers import Worker, WorkerPool


@dataclass(slots=True)
class PrefillChoice:
    """A chosen prefill and the work booked on it (hand it back with ``release``)."""

    worker: Worker
    work_tokens: float
    cached_tokens: int
    score: float
    released: bool = False


class PrefillChooser:
    """Least predicted prefill completion, from in-flight work and prefix affinity."""

    def __init__(self, pool: WorkerPool, *, block_tokens: int, prefix_blocks: int,
                 overhead_tokens: float | None = None) -> None:
        self.pool = pool
        self.block_tokens = block_tokens
        self.overhead_tokens = float(block_tokens if overhead_tokens is None
                                     else overhead_tokens)
        self.index = PrefixIndex(prefix_blocks)
        self._turn = itertools.count()

    def scores(self, workers: list[Worker], tokens: int, hashes: list[int]
               ) -> list[tuple[float, float, int]]:
        """(score, uncached work, cached tokens) of each of ``workers`` for this prompt."""
        overlap = self.index.overlap(hashes, len(self.pool.prefills)) if hashes else None
        out = []
        for w in workers:
            cached = 0 if overlap is None else min(int(overlap[w.index]) * self.block_tokens,
                                                   tokens)
            work = float(tokens - cached)
            external = max(w.running + w.waiting - w.inflight_at_scrape, 0.0) \
                if w.scraped else 0.0
            score = (w.prefill_work + external * tokens + work
                     + self.overhead_tokens * (w.inflight + external + 1))
            out.append((score, work, cached))
        return out

    def choose(self, tokens: int, hashes: list[int], exclude: set[int]
               ) -> PrefillChoice | None:
        """Book the best healthy prefill not in ``exclude`` (None when there is none)."""
        options = [w for w in self.pool.healthy("prefill") if w.index not in exclude]
        if not options:
            return None
        scored = self.scores(options, tokens, hashes)
        best = min(s for s, _, _ in scored)
        ties = [i for i, (s, _, _) in enumerate(scored) if s <= best + 1e-9]
        k = ties[next(self._turn) % len(ties)]
        worker = options[k]
        score, work, cached = scored[k]
        worker.prefill_work += work
        if hashes:
            self.index.add(hashes, worker.index)
        return PrefillChoice(worker, work, cached, score)

    def release(self, choice: PrefillChoice) -> None:
        """The prefill answered or failed: its work is no longer ahead of anyone (idempotent)."""
        if choice.released:
            return
        choice.released = True
        w = choice.worker
        w.prefill_work = max(w.prefill_work - choice.work_tokens, 0.0)
