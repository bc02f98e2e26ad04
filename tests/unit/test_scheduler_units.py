"""Scheduler building blocks without I/O: schema checkers, reservations, prefix index, vLLM
metrics parsing and the map feed (announcements: tests/unit/test_announcement.py)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from netkv_scheduler.app import check_select, openapi_document
from netkv_scheduler.settings import SchedulerSettings, settings_from_args

from netkv.core.congestion import CachedMapView, CongestionMap
from netkv.core.costmodel import static_tier_oracle
from netkv.core.paths import CachedOracle
from netkv.core.policies import policy_names
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError
from netkv.http.bodies import decode
from netkv.routing.instances import InstanceRegistry, Load
from netkv.routing.mapfeed import MapFeed
from netkv.routing.prefixes import PrefixIndex
from netkv.routing.requests import InstanceReport, SelectRequest
from netkv.routing.reservations import Reservations
from netkv.routing.scrape import parse_vllm_metrics

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def topo() -> Topology:
    return parse_topology({"fabric": {"leaf_oversubscription": 2, "pod_oversubscription": 3},
                           "fat_tree": {}})


# -- request bodies -----------------------------------------------------------------------------
GOOD: dict[str, Any] = {"request_id": "r", "prefill": "h000-p0", "prompt_tokens": 10}


def CHECK(body: Any) -> SelectRequest:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return check_select(decode(raw, SelectRequest), 8, policy_names())


@pytest.mark.parametrize(("patch", "field"), [
    ({"prompt_tokens": True}, "body.prompt_tokens"),
    ({"prompt_tokens": 1.5}, "body.prompt_tokens"),
    ({"prompt_tokens": 0}, "body.prompt_tokens"),
    ({"prompt_tokens": 10**12}, "body.prompt_tokens"),
    ({"request_id": ""}, "body.request_id"),
    ({"request_id": "x" * 257}, "body.request_id"),
    ({"prefill": None}, "body.prefill"),
    ({"block_hashes": [1, "2"]}, "body.block_hashes[1]"),
    ({"block_hashes": [-1]}, "body.block_hashes[0]"),
    ({"block_hashes": list(range(9))}, "body.block_hashes"),
    ({"policy": "best"}, "body.policy"),
    ({"reserve": "yes"}, "body.reserve"),
    ({"surprise": 1}, "body.surprise"),
])
def test_select_checker_names_the_field(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError) as info:
        CHECK(GOOD | patch)
    assert info.value.where == field


def test_select_checker_fills_defaults_and_requires_fields() -> None:
    out = CHECK(GOOD)
    assert out.reserve is True and out.output_tokens == 0
    for key in ("request_id", "prefill", "prompt_tokens"):
        with pytest.raises(InputError, match="missing required field"):
            CHECK({k: v for k, v in GOOD.items() if k != key})
    with pytest.raises(InputError, match="(?i)expected `object`"):
        CHECK([GOOD])


def test_number_checker_rejects_non_finite() -> None:
    with pytest.raises(InputError) as info:
        decode(b'{"name": "x", "running": 1e400}', InstanceReport)
    assert info.value.where == "body.running"
    with pytest.raises(InputError, match="matching regex"):
        decode(b'{"name": "x", "metrics_url": "file:///etc/passwd"}', InstanceReport)


def test_document_lists_every_endpoint_and_the_policies() -> None:
    doc = openapi_document(policy_names(), auth=True)
    assert set(doc["paths"]) == {"/v1/select", "/v1/release", "/v1/instances", "/healthz",
                                 "/readyz", "/metrics", "/v1/instances/{name}"}
    schema = doc["paths"]["/v1/select"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert schema["properties"]["policy"]["enum"] == list(policy_names())
    assert "401" in doc["paths"]["/v1/select"]["post"]["responses"]


# -- reservations -------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_reservations_count_expire_and_rebook() -> None:
    clock = Clock()
    res: Reservations[str] = Reservations(3, ttl_s=10.0, clock=clock)
    res.book("a", 1, transfer_s=0.5, transfer="ta")
    res.book("b", 1, transfer_s=2.0, transfer="tb")
    assert res.pending.tolist() == [0, 2, 0]
    _, old = res.book("a", 2, transfer_s=0.5, transfer="ta2")  # a retried select moves
    assert old is not None and old.transfer == "ta"
    assert res.pending.tolist() == [0, 1, 1]
    clock.now += 1.0
    assert res.sweep() == ["ta2"]  # a's transfer ended; b's is still on the wire
    assert res.pending.tolist() == [0, 1, 1]  # bookings stay until release or expiry
    released = res.release("b")
    assert released is not None and released.transfer == "tb"
    assert res.release("b") is None
    clock.now += 10.0
    assert res.sweep() == [] and res.pending.tolist() == [0, 0, 0]
    assert res.expired_total == 1 and res.released_total == 1 and not res.open


def test_expired_booking_hands_back_its_transfer() -> None:
    clock = Clock()
    res: Reservations[str] = Reservations(1, ttl_s=1.0, clock=clock)
    res.book("a", 0, transfer_s=5.0, transfer="t")
    clock.now += 2.0
    assert res.sweep() == ["t"] and res.pending.tolist() == [0]


def test_bookings_expire_on_time_when_the_clock_steps_back() -> None:
    """Expiries queue in clock order; one booked after the clock stepped back still expires
    ``ttl_s`` after it was made, before the ones booked earlier, and releases and
    re-bookings leave no entry that expires a live booking."""
    clock = Clock()
    res: Reservations[str] = Reservations(1, ttl_s=10.0, clock=clock)
    res.book("early", 0, transfer_s=0.0, transfer=None)
    clock.now -= 5.0  # stepped back
    res.book("late", 0, transfer_s=0.0, transfer=None)
    clock.now += 11.0  # 6 s after "early" was booked, 11 s after "late"
    assert res.sweep() == [] and set(res.open) == {"early"} and res.expired_total == 1
    res.release("early")
    res.book("early", 0, transfer_s=0.0, transfer=None)  # the same id again, later
    clock.now += 5.0  # past the first booking's expiry, not the second's
    assert res.sweep() == [] and set(res.open) == {"early"}
    clock.now += 5.0
    assert res.sweep() == [] and not res.open and res.expired_total == 2
    assert res.pending.tolist() == [0]


def test_released_bookings_leave_the_expiry_queue_bounded() -> None:
    clock = Clock()
    res: Reservations[str] = Reservations(1, ttl_s=60.0, clock=clock)
    for i in range(5000):
        res.book(f"r{i}", 0, transfer_s=0.0, transfer=None)
        res.release(f"r{i}")
        clock.now += 0.001
        res.sweep()
    assert len(res._expiry) + len(res._late) <= 1024 + 1
    assert len(res._transfers) == 0 and res.pending.tolist() == [0]

# -- prefix index -------------------------------------------------------------------------------
def test_prefix_overlap_counts_leading_blocks() -> None:
    index = PrefixIndex(max_blocks=100)
    assert index.overlap([1, 2, 3], 4) is None
    index.add([1, 2, 3], 0)
    index.add([1, 2, 9], 2)
    index.add([5, 6], 3)
    out = index.overlap([1, 2, 3, 4], 4)
    assert out is not None and out.tolist() == [3, 0, 2, 0]
    assert index.overlap([7], 4) is None


def test_prefix_index_is_bounded() -> None:
    index = PrefixIndex(max_blocks=3)
    index.add([1, 2, 3, 4], 0)
    assert len(index) == 3
    assert index.overlap([1], 1) is None  # the oldest block was evicted


# -- instances ----------------------------------------------------------------------------------
def test_registry_registers_and_refreshes(topo: Topology) -> None:
    reg = InstanceRegistry(topo, capacity_tokens=1000.0)
    n = len(reg.decoders)
    info = reg.register("extra-d", "decode", "h003", Load(2, 1, 0.5, 2000.0), None)
    assert len(reg.decoders) == n + 1 and reg.decode_host[-1] == topo.host_id("h003")
    assert reg.capacity_tokens[-1] == 2000.0 and reg.running[-1] == 2
    reg.register("extra-d", None, None, Load(0, 0, 0.1), "http://h003:1/metrics")
    assert reg.load_of(info) == Load(0, 0, 0.1, 2000.0)
    with pytest.raises(InputError) as bad:
        reg.register("new", "decode", "nowhere", None, None)
    assert bad.value.where == "body.host"
    with pytest.raises(InputError) as bad:
        reg.register("h000-d1", "prefill", None, None, None)
    assert bad.value.where == "body.role"
    with pytest.raises(InputError) as bad:
        reg.register("new2", None, "h001", None, None)
    assert bad.value.where == "body.role"


def test_parse_vllm_metrics_sums_label_sets() -> None:
    text = ("# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="a",engine="0"} 3\n'
            'vllm:num_requests_running{model_name="a",engine="1"} 2\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            'vllm:num_requests_waiting{model_name="a"} 4\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            'vllm:kv_cache_usage_perc{model_name="a"} 0.25\n')
    assert parse_vllm_metrics(text) == Load(5, 4, 0.25)
    with pytest.raises(ValueError, match="no vllm"):
        parse_vllm_metrics("# TYPE other gauge\nother 1\n")


# -- map feed ---------------------------------------------------------------------------------
def test_feed_decides_with_the_maps_own_estimate(topo: Topology) -> None:
    """The feed holds no cost formula of its own: it decides with the map's cached view
    (pinned to a reference computation in ``tests/unit/test_congestion.py``)."""
    now = 5000.0
    cmap = CongestionMap(topo, clock=lambda: now)
    rng = np.random.default_rng(3)
    for i, link in enumerate(topo.links):
        cmap.observe_link(i, float(rng.uniform(0, 0.9)) * link.capacity_bytes_s,
                          now - float(rng.uniform(0, 4)))
    for a, b in ((0, 1), (0, 5), (2, 7), (3, 3)):
        cmap.observe_rtt(a, b, srtt_s=2e-4 * (a + 1), min_s=1e-4, p99_s=5e-4, loss=0.02,
                         ts=now - 0.5 * b)
    cmap.version, cmap.created_ts = 1, now
    feed = MapFeed(topo, None, None, cache_s=10.0, clock=lambda: now)
    assert feed.install(cmap)
    fast = feed.view().oracle
    assert isinstance(fast, CachedMapView) and fast.cmap is cmap
    dsts = np.arange(topo.n_hosts, dtype=np.int64)
    nbytes = rng.uniform(1e6, 4e9, topo.n_hosts)
    for src in range(topo.n_hosts):
        want = cmap.estimate(src, dsts, nbytes, now=now)
        got = fast.estimate(src, dsts, nbytes)
        np.testing.assert_allclose(got.seconds, want.seconds, rtol=1e-12)
        np.testing.assert_allclose(got.bandwidth_bytes_s, want.bandwidth_bytes_s, rtol=1e-12)
        np.testing.assert_allclose(got.age_s, want.age_s)
        np.testing.assert_allclose(got.confidence, want.confidence)
        assert got.tier.tolist() == want.tier.tolist()


def test_cached_prior_matches_the_static_oracle(topo: Topology) -> None:
    prior = static_tier_oracle(topo)
    cached = CachedOracle(prior)
    dsts = np.array([7, 0, 3, 3, 5], dtype=np.int64)
    for src in range(topo.n_hosts):
        want = prior.estimate(src, dsts, 3e9)
        got = cached.estimate(src, dsts, 3e9)
        np.testing.assert_allclose(got.seconds, want.seconds, rtol=1e-12)
        np.testing.assert_allclose(got.latency_s, want.latency_s, rtol=1e-12)
        assert got.tier.tolist() == want.tier.tolist()


def test_feed_uses_priors_without_a_map_or_when_stale(topo: Topology) -> None:
    clock = Clock()
    feed = MapFeed(topo, None, None, stale_s=5.0, clock=clock)
    view = feed.view()
    assert view.stale and view.version is None
    assert feed.health() == (False, ["no congestion map yet"])
    cmap = CongestionMap(topo, clock=clock)
    cmap.version, cmap.created_ts = 4, clock.now
    assert feed.install(cmap)
    older = CongestionMap(topo, clock=clock)
    older.version = 3
    assert not feed.install(older)
    assert feed.view().version == 4 and not feed.view().stale
    clock.now += 6.0
    view = feed.view()
    assert view.stale and view.oracle is feed.prior
    ready, reasons = feed.health()
    assert ready and "stale" in reasons[0]


def test_settings_reject_bad_values() -> None:
    with pytest.raises(InputError, match="model"):
        SchedulerSettings(model="gpt-9")
    with pytest.raises(InputError, match="token"):
        SchedulerSettings(token="")
    for bad in (0.0, -33.0, math.inf, math.nan):
        with pytest.raises(InputError, match="kv_bytes_per_token"):
            SchedulerSettings(kv_bytes_per_token=bad)


def test_kv_bytes_per_token_overrides_the_model_preset(tmp_path: Path) -> None:
    assert SchedulerSettings().bytes_per_token == 327680.0  # llama3-70b's preset
    assert SchedulerSettings(kv_bytes_per_token=33).bytes_per_token == 33.0
    config = tmp_path / "netkv.yaml"
    config.write_text("scheduler: {kv_bytes_per_token: 33}\n")
    args = argparse.Namespace(config=str(config), environ={})
    assert settings_from_args(args).bytes_per_token == 33.0
    env = {"NETKV_KV_BYTES_PER_TOKEN": "65.5"}
    assert settings_from_args(argparse.Namespace(config=None, environ=env)).bytes_per_token \
        == 65.5
    config.write_text("scheduler: {kv_bytes_per_token: -1}\n")
    with pytest.raises(InputError, match="scheduler.kv_bytes_per_token"):
        settings_from_args(args)


@pytest.mark.parametrize("decoders", [1, 6, 16, 64, 1024])
def test_bench_fat_tree_has_one_decoder_per_host(decoders: int) -> None:
    from netkv.bench.scheduler import fat_tree_for
    topo = parse_topology({"fat_tree": fat_tree_for(decoders)})
    assert len(topo.instances_with_role("decode")) == decoders == topo.n_hosts
