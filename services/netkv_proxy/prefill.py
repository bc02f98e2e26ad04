"""Which prefill a request goes to: the one predicted to finish it first.

The prefill engines run one prefill at a time, first come first served, and skip the prompt
blocks already in their prefix cache (vLLM's automatic prefix caching). So the time until a
new prompt's prefill is done on worker ``w`` is the work still queued ahead of it plus its
own uncached work. The proxy knows both first-hand for the traffic it sends:

* the prompts it has in flight to ``w`` and how many of their tokens it expected ``w`` to
  compute (tokens minus the prefix ``w`` was expected to hold), summed as ``w.prefill_work``;
* how much of the oldest of them ``w`` has already computed: ``w`` has been busy with it
  since it was sent or since ``w``'s previous answer, whichever came later, at the prefill
  rate the proxy measured on its own answered prefills (:attr:`PrefillChooser.rate`);
* which prompt blocks it has itself sent to ``w`` (a :class:`PrefixIndex` over the prefill
  workers, as vllm-router's ``cache_aware`` keeps a radix tree per worker), hence how much of
  the new prompt ``w`` would skip.

Requests that reach ``w`` from elsewhere (another router) show only in the engine's gauges:
``running + waiting`` beyond what the proxy had in flight when that scrape was taken. Each
such request is counted as one of the new prompt's size (the proxy knows nothing better of
it). The score, in prompt tokens, is::

    work_w - done_w + external_w * tokens + (tokens - overlap_w * block)
        + overhead * (queued_w + 1)

``overhead`` is a prefill's fixed cost in tokens; it is a stated choice: one block of tokens
(``block_tokens``), not fitted to any testbed. All workers are assumed equally fast (one
model, one GPU type), so tokens rank them as seconds would, and one rate (tokens per second,
the median of the last ``rate_window`` answered prefills, each its booked work plus the
overhead over the time it held its worker) drains them all. ``done_w`` is at most the oldest
prompt's own work plus one overhead: a prefill that takes longer than the rate predicts is
taken as finishing any moment, never as having eaten into the prompts behind it. Until the
first prefill answered there is no rate and nothing is drained. The lowest score wins; ties
go in turn.

Why the drain (measured on the namespace testbed, 2026-12-01): without it a prefill busy with
the last 0.5 s of an 85k-token prompt was scored as 85k tokens ahead until its answer came,
so the next burst's prompts piled onto the two idle prefills (a queue of 2.2 s on one of
them) while two that would be free within a second got one prompt between them.

Compared with the shortest queue by request count (the proxy's first rule, and
``power_of_two``'s), a queue of one 12k-token prompt is no longer equal to a queue of one
1k-token prompt, and a count scraped before a burst drained does not hide an idle worker.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections import deque
from collections.abc import Callable
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
    booked_at: float = 0.0
    released: bool = False


class PrefillChooser:
    """Least predicted prefill completion, from in-flight work and prefix affinity."""

    def __init__(self, pool: WorkerPool, *, block_tokens: int, prefix_blocks: int,
                 overhead_tokens: float | None = None, rate_window: int = 16,
                 drain: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_window < 1:
            raise ValueError("rate_window must be >= 1")
        self.pool = pool
        self.block_tokens = block_tokens
        self.overhead_tokens = float(block_tokens if overhead_tokens is None
                                     else overhead_tokens)
        self.index = PrefixIndex(prefix_blocks)
        self.drain = drain  # False: booked work only (the rule before the drain)
        self.clock = clock
        self._turn = itertools.count()
        n = len(pool.prefills)
        self._booked: list[deque[PrefillChoice]] = [deque() for _ in range(n)]
        self._last_answer = [float("-inf")] * n
        self._rates: deque[float] = deque(maxlen=rate_window)
        self._rate: float | None = None

    @property
    def rate(self) -> float | None:
        """Measured prefill tokens per second (None before the first answered prefill)."""
        return self._rate

    def done_tokens(self, worker: Worker, now: float) -> float:
        """How much of ``worker``'s oldest booked prefill it has computed by ``now``."""
        booked = self._booked[worker.index]
        if not booked or self._rate is None or not self.drain:
            return 0.0
        head = booked[0]
        began = max(head.booked_at, self._last_answer[worker.index])
        return min(self._rate * max(now - began, 0.0),
                   head.work_tokens + self.overhead_tokens)

    def scores(self, workers: list[Worker], tokens: int, hashes: list[int],
               now: float | None = None) -> list[tuple[float, float, int]]:
        """(score, uncached work, cached tokens) of each of ``workers`` for this prompt."""
        now = self.clock() if now is None else now
        # The prompt's leading blocks each worker holds, from the index's runs (holder bit
        # masks, each a subset of the one before): the sum of the runs that include it, the
        # same count as PrefixIndex.overlap without building an array for a few workers
        runs = self.index.runs(hashes) if hashes else None
        out = []
        for w in workers:
            if runs is None:
                cached = 0
            else:
                bit = 1 << w.index
                held = sum(count for holders, count in runs if holders & bit)
                cached = min(held * self.block_tokens, tokens)
            work = float(tokens - cached)
            external = max(w.running + w.waiting - w.inflight_at_scrape, 0.0) \
                if w.scraped else 0.0
            ahead = max(w.prefill_work + self.overhead_tokens * w.inflight
                        - self.done_tokens(w, now), 0.0)
            score = (ahead + external * tokens + work
                     + self.overhead_tokens * (external + 1))
            out.append((score, work, cached))
        return out

    def choose(self, tokens: int, hashes: list[int], exclude: set[int]
               ) -> PrefillChoice | None:
        """Book the best healthy prefill not in ``exclude`` (None when there is none)."""
        options = [w for w in self.pool.healthy("prefill") if w.index not in exclude]
        if not options:
            return None
        now = self.clock()
        scored = self.scores(options, tokens, hashes, now)
        best = min(s for s, _, _ in scored)
        ties = [i for i, (s, _, _) in enumerate(scored) if s <= best + 1e-9]
        k = ties[next(self._turn) % len(ties)]
        worker = options[k]
        score, work, cached = scored[k]
        worker.prefill_work += work
        if hashes:
            self.index.add(hashes, worker.index)
        choice = PrefillChoice(worker, work, cached, score, booked_at=now)
        self._booked[worker.index].append(choice)
        return choice

    def release(self, choice: PrefillChoice) -> None:
        """The prefill answered or failed: its work is no longer ahead of anyone (idempotent).
        An answer of the oldest booked prefill is also a measurement of the rate."""
        if choice.released:
            return
        choice.released = True
        w = choice.worker
        w.prefill_work = max(w.prefill_work - choice.work_tokens, 0.0)
        booked = self._booked[w.index]
        now = self.clock()
        if booked and booked[0] is choice:
            booked.popleft()
            held = now - max(choice.booked_at, self._last_answer[w.index])
            if held > 0:
                self._rates.append((choice.work_tokens + self.overhead_tokens) / held)
                self._rate = statistics.median(self._rates)
        else:  # answered out of order (or failed): no measurement, just off the books
            self._booked[w.index] = deque(c for c in booked if c is not choice)
        self._last_answer[w.index] = now
