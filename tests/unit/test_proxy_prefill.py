"""The proxy's prefill choice (:mod:`netkv_proxy.prefill`): least predicted prefill work."""

from __future__ import annotations

import random

import pytest
from netkv_proxy.config import WorkerEntry
from netkv_proxy.prefill import PrefillChoice, PrefillChooser
from netkv_proxy.workers import WorkerPool

from netkv.core.topology_file import parse_topology

TOPOLOGY = {
    "fabric": {"nic_gbps": 400, "leaf_oversubscription": 1, "pod_oversubscription": 1},
    "hosts": [{"name": f"h{i}", "leaf": "l0", "pod": "p0"} for i in range(5)],
    "instances": [{"name": "p0", "role": "prefill", "host": "h0"},
                  {"name": "p1", "role": "prefill", "host": "h1"},
                  {"name": "p2", "role": "prefill", "host": "h2"},
                  {"name": "p3", "role": "prefill", "host": "h4"},
                  {"name": "d0", "role": "decode", "host": "h3"}],
}
BLOCK = 512


def chooser(n: int = 3) -> PrefillChooser:
    topo = parse_topology(TOPOLOGY)
    pool = WorkerPool(tuple(WorkerEntry(url=f"http://127.0.0.1:{9000 + i}", host=f"p{i}")
                            for i in range(n)),
                      (WorkerEntry(url="http://127.0.0.1:9100", host="d0"),), topo,
                      eject_after=2, readmit_after=2)
    return PrefillChooser(pool, block_tokens=BLOCK, prefix_blocks=10_000)


def test_a_short_queue_of_long_prompts_loses_to_a_longer_queue_of_short_ones() -> None:
    """By request count p0 (one prompt ahead) would beat p1 (two); by work it does not."""
    c = chooser(2)
    big = c.choose(12_000, [], set())
    assert big is not None and big.worker.index in (0, 1)
    other = 1 - big.worker.index
    small = [c.choose(1_000, [], {big.worker.index}) for _ in range(2)]
    assert all(s is not None and s.worker.index == other for s in small)
    assert c.pool.prefills[big.worker.index].prefill_work == 12_000
    for w in c.pool.prefills:  # the proxy's own counts, as _post_prefill keeps them
        w.inflight = 1 if w.index == big.worker.index else 2
    nxt = c.choose(4_000, [], set())
    assert nxt is not None and nxt.worker.index == other  # 2x1000 + 4000 < 12000 + 4000


def test_work_is_handed_back_once() -> None:
    c = chooser(2)
    a = c.choose(5_000, [], set())
    assert a is not None
    c.release(a)
    c.release(a)
    assert [w.prefill_work for w in c.pool.prefills] == [0.0, 0.0]


def test_a_prefix_the_proxy_sent_to_a_prefill_draws_its_continuation_there() -> None:
    """The second turn of a conversation reuses the first turn's 10 blocks on p_k; with
    equal queues elsewhere it goes to p_k, priced at its uncached tail only."""
    c = chooser(3)
    first_hashes = list(range(100, 110))
    first = c.choose(10 * BLOCK, first_hashes, set())
    assert first is not None
    c.release(first)
    again = c.choose(12 * BLOCK, [*first_hashes, 200, 201], set())
    assert again is not None and again.worker.index == first.worker.index
    assert again.cached_tokens == 10 * BLOCK and again.work_tokens == 2 * BLOCK


def test_affinity_yields_when_the_holder_is_busy_enough() -> None:
    c = chooser(2)
    hashes = list(range(10))
    first = c.choose(10 * BLOCK, hashes, set())
    assert first is not None
    c.release(first)
    holder = first.worker
    holder.prefill_work, holder.inflight = 40 * BLOCK, 3  # a long queue there
    nxt = c.choose(11 * BLOCK, [*hashes, 99], set())
    assert nxt is not None and nxt.worker.index != holder.index


def test_requests_from_elsewhere_count_from_the_gauges_not_our_own_twice() -> None:
    c = chooser(2)
    p0, p1 = c.pool.prefills
    # p0: the scrape saw 3 requests while the proxy had 3 in flight there -> nothing external
    p0.scraped, p0.running, p0.waiting, p0.inflight_at_scrape = True, 1.0, 2.0, 3
    p0.inflight, p0.prefill_work = 3, 3_000.0
    # p1: the scrape saw 2 requests the proxy never sent (another router's)
    p1.scraped, p1.running, p1.waiting, p1.inflight_at_scrape = True, 1.0, 1.0, 0
    got = c.choose(4_000, [], set())
    assert got is not None and got.worker is p0  # 3000 + 4000 + 4*512 < 2*4000 + 4000 + 3*512


def test_ties_go_in_turn_and_excluded_or_ejected_workers_are_skipped() -> None:
    c = chooser(3)
    seen = set()
    for _ in range(3):
        got = c.choose(1_000, [], set())
        assert got is not None
        seen.add(got.worker.index)
        c.release(got)
    assert seen == {0, 1, 2}
    c.pool.prefills[0].healthy = False
    picks = {x.worker.index for x in (c.choose(10, [], {1}) for _ in range(3)) if x}
    assert picks == {2}
    assert c.choose(10, [], {1, 2}) is None


# -- the drain: work a prefill has already done is not ahead of anyone ----------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def timed(n: int) -> tuple[PrefillChooser, Clock]:
    c, clock = chooser(n), Clock()
    c.clock = clock
    return c, clock


def book(c: PrefillChooser, tokens: int, only: int) -> PrefillChoice:
    """Book ``tokens`` on prefill ``only`` and count it in flight, as ``_post_prefill`` does."""
    got = c.choose(tokens, [], {w.index for w in c.pool.prefills} - {only})
    assert got is not None and got.worker.index == only
    got.worker.inflight += 1
    return got


def answer(c: PrefillChooser, choice: PrefillChoice) -> None:
    c.release(choice)
    choice.worker.inflight -= 1


def test_the_rate_is_measured_from_answers_queued_ones_from_the_previous_answer() -> None:
    c, clock = timed(2)
    assert c.rate is None
    a, b = book(c, 1_000, 0), book(c, 3_000, 0)  # both sent at t=0, b queued behind a
    clock.now = 0.1
    answer(c, a)  # (1000 + 512) / 0.1
    assert c.rate == pytest.approx(15_120)
    clock.now = 0.3
    answer(c, b)  # held since a's answer: (3000 + 512) / 0.2 = 17560; median of the two
    assert c.rate == pytest.approx((15_120 + 17_560) / 2)


def test_an_answer_out_of_order_is_no_measurement() -> None:
    c, clock = timed(2)
    a, b = book(c, 1_000, 0), book(c, 3_000, 0)
    clock.now = 0.2
    answer(c, b)
    assert c.rate is None
    assert c.pool.prefills[0].prefill_work == 1_000
    clock.now = 0.3
    answer(c, a)  # now the oldest; held since b's answer: 1512 / 0.1
    assert c.rate == pytest.approx(15_120)


def test_without_a_rate_nothing_is_drained() -> None:
    c, clock = timed(2)
    book(c, 40_000, 0)
    clock.now = 100.0
    assert c.done_tokens(c.pool.prefills[0], clock.now) == 0.0
    assert c.scores(c.pool.prefills, 1_000, [])[0][0] == 40_000 + 512 + 1_000 + 512


def rated(n: int, rate_tokens: int = 31_488) -> tuple[PrefillChooser, Clock]:
    """A chooser whose measured rate is (rate_tokens + 512) tokens/s (one answer of 1 s)."""
    c, clock = timed(n)
    clock.now = -10.0
    warm = book(c, rate_tokens, n - 1)
    clock.now = -9.0
    answer(c, warm)
    assert c.rate == pytest.approx(rate_tokens + 512)
    return c, clock


def test_a_long_prefill_half_done_is_scored_by_what_is_left() -> None:
    """Rate 32,000/s. p0 got 40,000 tokens at t=1.0, p1 25,000 at t=1.9; at t=2.0 p0 has
    32,000 of its 40,512 done (8,512 left), p1 3,200 of 25,512 (22,312 left): a 1,000-token
    prompt goes to p0 (8,512 + 1,512 = 10,024 < 22,312 + 1,512); by booked work alone it
    would go to p1 (25,512 + 1,512 < 40,512 + 1,512)."""
    c, clock = rated(3)
    c.pool.prefills[2].healthy = False
    clock.now = 1.0
    book(c, 40_000, 0)
    clock.now = 1.9
    book(c, 25_000, 1)
    clock.now = 2.0
    p0, p1 = c.pool.prefills[:2]
    assert c.done_tokens(p0, 2.0) == pytest.approx(32_000)
    assert c.done_tokens(p1, 2.0) == pytest.approx(3_200)
    (s0, _, _), (s1, _, _) = c.scores([p0, p1], 1_000, [])
    assert s0 == pytest.approx(10_024)
    assert s1 == pytest.approx(23_824)
    got = c.choose(1_000, [], set())
    assert got is not None and got.worker is p0


def test_a_prefill_late_on_its_oldest_prompt_keeps_the_rest_ahead() -> None:
    """The drain stops at the oldest prompt's own work: the one queued behind it is not
    taken as started however late the answer is."""
    c, clock = rated(2)
    clock.now = 0.0
    book(c, 10_000, 0)
    book(c, 5_000, 0)
    clock.now = 100.0
    p0 = c.pool.prefills[0]
    assert c.done_tokens(p0, clock.now) == pytest.approx(10_512)
    assert c.scores([p0], 1_000, [])[0][0] == pytest.approx(5_512 + 1_512)


def test_the_next_burst_spreads_over_prefills_about_to_finish() -> None:
    """The testbed's pile-up in miniature (quiet fabric, slice 400): p0 and p1 have been
    computing an 85,000- and a 69,000-token prompt for 2.2 s at 32,000/s (15,112 and 0
    tokens left), p2 and p3 are idle. Seven 10,000-token prompts (10,512 each with the
    overhead): p1, p2, p3 take two each (21,024 ahead), p0 the seventh (15,112 + 10,512 =
    25,624 < 21,024 + 10,512). By booked work alone p0 and p1 look 85k and 69k busy and
    p2 and p3 would take all seven."""
    def burst(c: PrefillChooser) -> list[int]:
        picks = []
        for _ in range(7):
            got = c.choose(10_000, [], set())
            assert got is not None
            got.worker.inflight += 1
            picks.append(got.worker.index)
        return sorted(picks)

    c, clock = rated(4)
    clock.now = 0.0
    book(c, 85_000, 0)
    book(c, 69_000, 1)
    clock.now = 2.2
    assert burst(c) == [0, 1, 1, 2, 2, 3, 3]

    stale, clock = timed(4)  # no answer yet, so no rate: booked work only
    book(stale, 85_000, 0)
    book(stale, 69_000, 1)
    clock.now = 2.2
    assert set(burst(stale)) == {2, 3}


def test_cached_tokens_are_the_prefix_indexs_overlap() -> None:
    """scores() counts each worker's held leading blocks from the index's runs; the same
    numbers as PrefixIndex.overlap, over random prompts sharing prefixes on 4 workers."""
    rng = random.Random(12)
    c = chooser(4)
    prompts = [[rng.randrange(1 << 62) for _ in range(rng.randrange(1, 12))]
               for _ in range(30)]
    for _ in range(400):
        base = rng.choice(prompts)
        hashes = base[:rng.randrange(1, len(base) + 1)] + \
            [rng.randrange(1 << 62) for _ in range(rng.randrange(0, 3))]
        tokens = len(hashes) * BLOCK - rng.randrange(0, 2 * BLOCK)
        overlap = c.index.overlap(hashes, 4)
        for w, (_, work, cached) in zip(c.pool.prefills, c.scores(c.pool.prefills, tokens,
                                                                   hashes), strict=True):
            want = 0 if overlap is None else min(int(overlap[w.index]) * BLOCK, tokens)
            assert cached == want and work == float(tokens - want)
        if rng.random() < 0.7:
            c.index.add(hashes, rng.randrange(4))
