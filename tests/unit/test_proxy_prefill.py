"""The proxy's prefill choice (:mod:`netkv_proxy.prefill`): least predicted prefill work."""

from __future__ import annotations

from netkv_proxy.config import WorkerEntry
from netkv_proxy.prefill import PrefillChooser
from netkv_proxy.workers import WorkerPool

from netkv.core.topology_file import parse_topology

TOPOLOGY = {
    "fabric": {"nic_gbps": 400, "leaf_oversubscription": 1, "pod_oversubscription": 1},
    "hosts": [{"name": f"h{i}", "leaf": "l0", "pod": "p0"} for i in range(4)],
    "instances": [{"name": "p0", "role": "prefill", "host": "h0"},
                  {"name": "p1", "role": "prefill", "host": "h1"},
                  {"name": "p2", "role": "prefill", "host": "h2"},
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
