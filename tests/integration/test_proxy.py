"""The P/D proxy in front of real emulated-engine processes, driven by the official
``openai`` client over loopback HTTP.

Engines are ``netkv engine`` subprocesses (module scope: they are reset between tests through
their test hooks); the proxy runs in the test's event loop so its bookings, placements and
tasks can be counted after every failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from helpers import until
from netkv_proxy.app import Proxy
from netkv_proxy.cli import serving
from netkv_proxy.config import ProxySettings, WorkerEntry

from netkv.adapters.mqtt_client import mqtt_client
from netkv.config import MqttSettings, RedisSettings
from netkv.contracts.names import MqttTopics, RedisKeys
from netkv.contracts.snapshot import encode_snapshot
from netkv.core.congestion import CongestionMap
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.engine.wire import WORDS
from netkv.localservers import MosquittoServer, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BYTES_PER_TOKEN = 64.0
MODEL = "netkv/emulated"
# Prefill pa on host a1 and pb on b1; decoder "near" on a2 (a1's leaf), "far" on b2.
TOPOLOGY = {
    "fabric": {"nic_gbps": 400, "leaf_oversubscription": 1, "pod_oversubscription": 1},
    "hosts": [{"name": "a1", "leaf": "la", "pod": "pa"}, {"name": "a2", "leaf": "la", "pod": "pa"},
              {"name": "b1", "leaf": "lb", "pod": "pb"}, {"name": "b2", "leaf": "lb", "pod": "pb"}],
    "instances": [{"name": "pa", "role": "prefill", "host": "a1"},
                  {"name": "pb", "role": "prefill", "host": "b1"},
                  {"name": "near", "role": "decode", "host": "a2"},
                  {"name": "far", "role": "decode", "host": "b2"}],
}


@dataclass
class EngineProc:
    role: str
    url: str
    side_channel: int
    proc: subprocess.Popen[str]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.close()

    def close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_engine(role: str, *extra: str) -> EngineProc:
    """``netkv engine`` on free ports; returns once it printed its ready line."""
    cmd = [sys.executable, "-m", "netkv.cli", "engine", "--role", role, "--port", "0",
           "--side-channel-port", "0", "--test-hooks", "--kv-bytes-per-token",
           str(BYTES_PER_TOKEN), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            if " ready: " in line:
                url = line.split(" ready: ")[1].split()[0]
                port = int(line.rsplit("side_channel=", 1)[1])
                return EngineProc(role, url, port, proc)
    proc.kill()
    proc.wait(5)
    proc.stdout.close()
    raise RuntimeError(f"engine {role} did not start: {cmd}")


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, EngineProc]]:
    """Two prefills and two decoders, shared by the module's tests."""
    started: dict[str, EngineProc] = {}
    try:
        started["pa"] = start_engine("prefill")
        started["pb"] = start_engine("prefill")
        started["near"] = start_engine("decode")
        started["far"] = start_engine("decode")
        yield started
    finally:
        for e in started.values():
            if e.proc.poll() is None:
                e.proc.terminate()
                try:
                    e.proc.wait(5)
                except subprocess.TimeoutExpired:
                    e.kill()
            e.close()


@pytest.fixture
def topology() -> Topology:
    return parse_topology(TOPOLOGY)


async def call(method: str, url: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as http, http.request(method, url, json=body) as resp:
        text = await resp.text()
        return json.loads(text) if text and resp.content_type == "application/json" else text


async def reset(engines: dict[str, EngineProc]) -> None:
    for e in engines.values():
        if e.proc.poll() is None:
            await call("POST", e.url + "/netkv/faults", {})


def settings_for(engines: dict[str, EngineProc], **kw: Any) -> ProxySettings:
    pre = tuple(WorkerEntry(url=engines[n].url, host=n, bootstrap_port=engines[n].side_channel)
                for n in ("pa", "pb"))
    dec = tuple(WorkerEntry(url=engines[n].url, host=n) for n in ("near", "far"))
    values: dict[str, Any] = {"port": 0, "prefill": pre, "decode": dec,
                              "kv_bytes_per_token": BYTES_PER_TOKEN, "health_interval_s": 0.2,
                              "health_timeout_s": 1.0,
                              # the whole file runs on either front (default h1)
                              "front": os.environ.get("NETKV_TEST_PROXY_FRONT", "h1")}
    return ProxySettings(**(values | kw))


@asynccontextmanager
async def running(engines: dict[str, EngineProc], topology: Topology,
                  **kw: Any) -> AsyncIterator[tuple[Proxy, openai.AsyncOpenAI]]:
    await reset(engines)
    async with serving(settings_for(engines, **kw), topology) as (proxy, url):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                    timeout=30)
        try:
            yield proxy, client
        finally:
            await client.close()


async def assert_no_leaks(proxy: Proxy, engines: dict[str, EngineProc], tasks_before: int
                          ) -> None:
    """Nothing the failure opened stays open: bookings, placements, upstream requests,
    in-flight counts, the proxy's tasks, and the engines' requests and side channels."""
    def proxy_clean() -> bool:
        return (proxy.placement.bookings.active == 0 and not proxy.placement.open
                and proxy.upstream_open == 0 and all(w.inflight == 0 for w in proxy.pool.all)
                and len(asyncio.all_tasks()) <= tasks_before)

    await until(proxy_clean)

    async def engines_clean() -> bool:
        for e in engines.values():
            if e.proc.poll() is not None:
                continue
            s = await call("GET", e.url + "/netkv/state")
            if s["active"] or s["running"] or s["waiting"] or s["side_channel_connections"]:
                return False
        return True

    await until(engines_clean)


async def bodies(engines: dict[str, EngineProc], request_id: str) -> list[dict[str, Any]]:
    """Every body the engines received under ``request_id``."""
    out = []
    for e in engines.values():
        out += [r["body"] for r in await call("GET", e.url + "/netkv/requests")
                if r["request_id"] == request_id]
    return out


def text_of(n: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(n))


async def metric(url: str, name: str) -> float:
    text = await call("GET", url + "/metrics")
    total = 0.0
    for line in str(text).splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- the two-leg flow ---------------------------------------------------------------------
async def test_openai_client_through_the_proxy_two_legs_and_kv_pull(
        engines: dict[str, EngineProc], topology: Topology) -> None:
    async with running(engines, topology) as (_, client):
        prompt = "The quick brown fox jumps over the lazy dog. " * 20
        raw = await client.completions.with_raw_response.create(
            model=MODEL, prompt=prompt, max_tokens=7,
            extra_headers={"x-request-id": "req-nonstream-1"})
        done = raw.parse()
        assert raw.headers["x-request-id"] == "req-nonstream-1"
        assert done.choices[0].text == text_of(7)
        assert done.usage is not None and done.usage.completion_tokens == 7
        prompt_tokens = done.usage.prompt_tokens
        prefill_name, decode_name = raw.headers["x-netkv-prefill"], raw.headers["x-netkv-decode"]

        # the two legs as the engines saw them
        pre = [r for r in await call("GET", engines[prefill_name].url + "/netkv/requests")
               if r["request_id"] == "req-nonstream-1"]
        dec = [r for r in await call("GET", engines[decode_name].url + "/netkv/requests")
               if r["request_id"] == "req-nonstream-1"]
        assert len(pre) == 1 and len(dec) == 1
        pbody, dbody = pre[0]["body"], dec[0]["body"]
        assert pbody["max_tokens"] == 1 and pbody["stream"] is False
        assert pbody["kv_transfer_params"] == {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}
        ktp = dbody["kv_transfer_params"]
        assert dbody["max_tokens"] == 7
        assert ktp["do_remote_prefill"] is True
        assert ktp["remote_port"] == engines[prefill_name].side_channel
        assert ktp["remote_request_id"] == "req-nonstream-1"
        state = await call("GET", engines[prefill_name].url + "/netkv/state")
        assert ktp["remote_engine_id"] == state["engine_id"]
        assert len(ktp["remote_block_ids"]) == -(-prompt_tokens // 16)

        # the decode pulled the KV bytes from that prefill's side channel
        want = prompt_tokens * BYTES_PER_TOKEN
        assert await metric(engines[decode_name].url, "netkv_engine_kv_pulled_bytes_total") \
            >= want
        assert await metric(engines[prefill_name].url, "netkv_engine_kv_served_bytes_total") \
            >= want

        # streaming completions, with stream_options and min_tokens (removed for the prefill)
        stream = await client.completions.create(
            model=MODEL, prompt="stream me please", max_tokens=5, stream=True,
            stream_options={"include_usage": True}, extra_body={"min_tokens": 2},
            extra_headers={"x-request-id": "req-stream-1"})
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(pieces) == text_of(5) and len(pieces) == 5
        assert usage is not None and usage.completion_tokens == 5
        seen = {n: [r for r in await call("GET", e.url + "/netkv/requests")
                    if r["request_id"] == "req-stream-1"] for n, e in engines.items()}
        legs = {n: r[0]["body"] for n, r in seen.items() if r}
        assert len(legs) == 2
        pbody = next(b for b in legs.values() if b["kv_transfer_params"]["do_remote_decode"])
        dbody = next(b for b in legs.values() if not b["kv_transfer_params"]["do_remote_decode"])
        assert "stream_options" not in pbody and "min_tokens" not in pbody
        assert pbody["stream"] is False
        assert dbody["stream"] is True and dbody["min_tokens"] == 2
        assert dbody["stream_options"] == {"include_usage": True}

        # chat, streaming and not (max_completion_tokens set to 1 on the prefill leg too)
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say something."}],
            max_completion_tokens=4, extra_headers={"x-request-id": "req-chat-1"})
        assert chat.choices[0].message.content == text_of(4)
        pbody = next(b for b in await bodies(engines, "req-chat-1")
                     if b["kv_transfer_params"]["do_remote_decode"])
        assert pbody["max_completion_tokens"] == 1 and pbody["max_tokens"] == 1
        chunks = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Stream something."}],
            max_tokens=3, stream=True)
        content = [c.choices[0].delta.content or "" async for c in chunks if c.choices]
        assert "".join(content) == text_of(3)

        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        text = await call("GET", str(client.base_url).removesuffix("/v1/") + "/metrics")
        assert 'netkv_proxy_requests_total{endpoint="chat",outcome="ok"} 2.0' in text
        assert "netkv_proxy_ttft_seconds_count 2.0" in text
        assert 'netkv_proxy_decisions_total{policy="netkv",source="prior"' in text


async def test_bad_bodies_get_400_naming_the_field(engines: dict[str, EngineProc],
                                                   topology: Topology) -> None:
    async with running(engines, topology) as (_, client):
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=0)
        assert info.value.body is not None
        assert info.value.body["param"] == "max_tokens"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model=MODEL, messages=[{"content": "x"}])  # type: ignore[list-item]
        assert info.value.body["param"] == "messages[0].role"  # type: ignore[index]
        # past the engine's context length: the decode's 400 comes through as it is
        with pytest.raises(openai.BadRequestError, match="maximum context length") as info:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=200_000)
        assert info.value.body["param"] == "max_tokens"  # type: ignore[index]
        url = str(client.base_url).removesuffix("/v1/")
        async with aiohttp.ClientSession() as http, \
                http.post(url + "/v1/completions", data=b"{not json") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "body"
        text = await call("GET", url + "/metrics")
        assert 'netkv_proxy_rejected_requests_total{reason="out_of_range"} 1.0' in text
        assert 'netkv_proxy_rejected_requests_total{reason="missing_field"} 1.0' in text
        assert 'netkv_proxy_rejected_requests_total{reason="not_json"} 1.0' in text


async def test_push_mode_sends_the_decode_no_block_ids(engines: dict[str, EngineProc],
                                                     topology: Topology) -> None:
    """vLLM's WRITE flow (toy_push_proxy_server.py): the decode gets the prefill's
    coordinates without remote_block_ids, and the KV still arrives before its first token."""
    async with running(engines, topology, mode="push") as (_, client):
        raw = await client.completions.with_raw_response.create(
            model=MODEL, prompt="push me " * 40, max_tokens=3,
            extra_headers={"x-request-id": "req-push-1"})
        done = raw.parse()
        assert done.choices[0].text == text_of(3) and done.usage is not None
        dec = next(b for b in await bodies(engines, "req-push-1")
                   if not b["kv_transfer_params"].get("do_remote_decode"))
        ktp = dec["kv_transfer_params"]
        assert "remote_block_ids" not in ktp and ktp["do_remote_prefill"] is True
        assert ktp["remote_port"] == engines[raw.headers["x-netkv-prefill"]].side_channel
        assert int(raw.headers["x-netkv-kv-bytes"]) == done.usage.prompt_tokens * BYTES_PER_TOKEN


async def test_bootstrap_mode_chooses_the_pair_up_front(engines: dict[str, EngineProc],
                                                        topology: Topology) -> None:
    async with running(engines, topology, mode="bootstrap", policy="netkv_pair") as \
            (_, client):
        before = {n: await metric(engines[n].url, "netkv_engine_kv_pulled_bytes_total")
                  for n in ("near", "far")}
        raw = await client.completions.with_raw_response.create(
            model=MODEL, prompt="bootstrap me " * 30, max_tokens=6,
            extra_headers={"x-request-id": "req-boot-1"})
        done = raw.parse()
        assert done.choices[0].text == text_of(6)
        p, d = raw.headers["x-netkv-prefill"], raw.headers["x-netkv-decode"]
        pre = next(r["body"] for r in await call("GET", engines[p].url + "/netkv/requests")
                   if r["request_id"] == "req-boot-1")
        dec = next(r["body"] for r in await call("GET", engines[d].url + "/netkv/requests")
                   if r["request_id"] == "req-boot-1")
        assert pre["bootstrap_room"] == dec["bootstrap_room"]
        assert dec["bootstrap_port"] == engines[p].side_channel
        assert done.usage is not None
        pulled = await metric(engines[d].url, "netkv_engine_kv_pulled_bytes_total")
        assert pulled - before[d] == done.usage.prompt_tokens * BYTES_PER_TOKEN
        # netkv_pair on an idle fabric puts the pair on one leaf
        assert (p, d) in {("pa", "near"), ("pb", "far")}


async def test_a_repeated_prefix_goes_where_it_is_and_moves_only_the_rest(
        engines: dict[str, EngineProc], topology: Topology) -> None:
    """Token-id prompts are hashed into 16-token blocks; the decoder that got a prefix from
    the proxy holds it (delta transfer), and the decode engine pulls only the blocks it
    lacks."""
    # decisions priced at the 70B preset (the engines move 64 B/token): the prefix matters
    async with running(engines, topology, kv_bytes_per_token=None) as (_, client):
        shared = [7_000_000 + i for i in range(1600)]  # 100 blocks nobody has seen
        first = await client.completions.with_raw_response.create(
            model=MODEL, prompt=[*shared, 1, 2, 3], max_tokens=1)
        d = first.headers["x-netkv-decode"]
        pulled = await metric(engines[d].url, "netkv_engine_kv_pulled_bytes_total")
        again = await client.completions.with_raw_response.create(
            model=MODEL, prompt=[*shared, 4, 5, 6, 7, 8], max_tokens=1)
        assert again.headers["x-netkv-decode"] == d
        moved = await metric(engines[d].url, "netkv_engine_kv_pulled_bytes_total") - pulled
        assert 0 < moved <= 16 * BYTES_PER_TOKEN  # the one block after the shared prefix
        assert int(again.headers["x-netkv-kv-bytes"]) == moved


# -- failures -----------------------------------------------------------------------------
async def test_prefill_503_is_retried_on_another_prefill(engines: dict[str, EngineProc],
                                                         topology: Topology) -> None:
    async with running(engines, topology) as (proxy, client):
        tasks = len(asyncio.all_tasks())
        await call("POST", engines["pa"].url + "/netkv/faults", {"completions_status": 503})
        for i in range(4):
            raw = await client.completions.with_raw_response.create(
                model=MODEL, prompt=f"retry {i}", max_tokens=2)
            assert raw.parse().choices[0].text == text_of(2)
            assert raw.headers["x-netkv-prefill"] == "pb"
        tried = await call("GET", engines["pa"].url + "/netkv/requests")
        assert any(str(r["body"].get("prompt", "")).startswith("retry") for r in tried)
        assert proxy.metrics.retries.labels("503")._value.get() >= 1
        await assert_no_leaks(proxy, engines, tasks)


async def test_prefill_timeout_is_retried(engines: dict[str, EngineProc],
                                          topology: Topology) -> None:
    async with running(engines, topology, prefill_timeout_s=0.5) as (proxy, client):
        tasks = len(asyncio.all_tasks())
        await call("POST", engines["pb"].url + "/netkv/faults", {"stall_s": 3.0})
        for i in range(3):
            raw = await client.completions.with_raw_response.create(
                model=MODEL, prompt=f"slow {i}", max_tokens=2)
            assert raw.parse().choices[0].text == text_of(2)
            assert raw.headers["x-netkv-prefill"] == "pa"
        assert proxy.metrics.retries.labels("timeout")._value.get() >= 1
        # every prefill failing: a 502 in OpenAI's shape, nothing left open
        await call("POST", engines["pa"].url + "/netkv/faults", {"completions_status": 503})
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(model=MODEL, prompt="nobody", max_tokens=2)
        assert info.value.status_code == 502
        await call("POST", engines["pb"].url + "/netkv/faults", {})
        await assert_no_leaks(proxy, engines, tasks)


async def test_client_disconnect_cancels_both_legs(engines: dict[str, EngineProc],
                                                   topology: Topology) -> None:
    async with running(engines, topology) as (proxy, client):
        tasks = len(asyncio.all_tasks())
        url = str(client.base_url).removesuffix("/v1/")
        body = {"model": MODEL, "prompt": "a long answer", "max_tokens": 1000, "stream": True}
        async with aiohttp.ClientSession() as http, \
                http.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readline()  # the first chunk arrived
            # the KV is in: its booking is handed back, the placement stays open
            assert proxy.placement.bookings.active == 0
            assert len(proxy.placement.open) == 1
        # leaving the block closed the connection mid-stream
        await assert_no_leaks(proxy, engines, tasks)
        # ... and during the prefill leg
        await call("POST", engines["pa"].url + "/netkv/faults", {"stall_s": 2.0})
        await call("POST", engines["pb"].url + "/netkv/faults", {"stall_s": 2.0})
        async def give_up_early() -> None:
            async with asyncio.timeout(0.5), aiohttp.ClientSession() as http, \
                    http.post(url + "/v1/completions", json=body) as resp:
                await resp.read()

        with pytest.raises(TimeoutError):
            await give_up_early()
        await reset(engines)
        await assert_no_leaks(proxy, engines, tasks)


async def test_worker_ejection_and_readmission(engines: dict[str, EngineProc],
                                               topology: Topology) -> None:
    async with running(engines, topology) as (proxy, client):
        tasks = len(asyncio.all_tasks())
        near = next(w for w in proxy.pool.decodes if w.name == "near")
        await call("POST", engines["near"].url + "/netkv/faults", {"health_status": 503})
        await until(lambda: not near.healthy)
        for i in range(4):
            raw = await client.completions.with_raw_response.create(
                model=MODEL, prompt=f"ejected {i}", max_tokens=1)
            assert raw.headers["x-netkv-decode"] == "far"
        text = await call("GET", str(client.base_url).removesuffix("/v1/") + "/metrics")
        assert 'netkv_proxy_worker_healthy{role="decode",worker="near"} 0.0' in text
        await call("POST", engines["near"].url + "/netkv/faults", {})
        await until(lambda: near.healthy)
        assert near.ejections == 1
        await assert_no_leaks(proxy, engines, tasks)


async def test_decode_dying_mid_stream_is_a_clear_error(topology: Topology,
                                                        engines: dict[str, EngineProc]
                                                        ) -> None:
    doomed = start_engine("decode", "--tpot-s", "0.05")
    try:
        mine = {**engines, "far": doomed}
        async with running(mine, topology) as (proxy, client):
            far = next(w for w in proxy.pool.decodes if w.name == "far")
            near = next(w for w in proxy.pool.decodes if w.name == "near")
            await call("POST", engines["near"].url + "/netkv/faults", {"health_status": 503})
            await until(lambda: not near.healthy)
            tasks = len(asyncio.all_tasks())
            stream = await client.completions.create(model=MODEL, prompt="die", max_tokens=200,
                                                     stream=True)
            got = 0

            async def read_until_it_breaks() -> None:
                nonlocal got
                async for _ in stream:
                    got += 1
                    if got == 3:
                        doomed.kill()

            with pytest.raises(openai.APIError, match="failed mid-stream"):
                await read_until_it_breaks()
            assert got >= 3
            await until(lambda: not far.healthy)
            # and a decode that is gone before the request: 502 in OpenAI's shape
            await call("POST", engines["near"].url + "/netkv/faults", {})
            await until(lambda: near.healthy)
            await assert_no_leaks(proxy, {k: v for k, v in engines.items() if k != "far"},
                                  tasks)
            assert proxy.metrics.requests.labels("completions", "decode_failed") \
                ._value.get() == 1
    finally:
        doomed.kill()


# -- the live map ---------------------------------------------------------------------------
async def publish(redis: RedisServer, mosquitto: MosquittoServer, cmap: CongestionMap,
                  version: int) -> None:
    """What the oracle does: snapshot and version in Redis, then the retained announcement."""
    keys = RedisKeys()
    client = aioredis.Redis.from_url(redis.url)
    try:
        await client.set(keys.map_snapshot, encode_snapshot(cmap, version))
        await client.set(keys.map_version, version)
    finally:
        await client.aclose()
    async with mqtt_client(MqttSettings(port=mosquitto.port)) as mqtt:
        await mqtt.publish(MqttTopics().map_version, json.dumps({"version": version}), qos=1,
                           retain=True)


def measured(topology: Topology, congested: dict[str, float]) -> CongestionMap:
    cmap = CongestionMap(topology)
    now = time.time()
    for i, link in enumerate(topology.links):
        cmap.observe_link(i, congested.get(link.name, 0.0) * link.capacity_bytes_s, now)
    return cmap


async def test_map_steers_decodes_and_stale_map_falls_back_to_priors(
        engines: dict[str, EngineProc], topology: Topology, redis_server: RedisServer,
        mosquitto_server: MosquittoServer) -> None:
    for e in engines.values():
        await call("POST", e.url + "/netkv/faults", {})
    settings = settings_for(engines, kv_bytes_per_token=None,  # the 70B preset
                            redis=RedisSettings(url=redis_server.url),
                            mqtt=MqttSettings(port=mosquitto_server.port, keepalive_s=2),
                            map_stale_s=4.0, map_poll_s=0.2, oracle_cache_s=0.0)
    async with serving(settings, topology) as (proxy, url):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        try:
            count = iter(range(1000))

            async def place() -> tuple[str, str, str]:
                # 2000 fresh token ids (no prefix anyone holds): ~650 MB of KV at 70B
                k = next(count)
                raw = await client.completions.with_raw_response.create(
                    model=MODEL, prompt=[k * 2000 + i for i in range(2000)], max_tokens=1)
                return (raw.headers["x-netkv-prefill"], raw.headers["x-netkv-decode"],
                        raw.headers["x-netkv-map"])

            p, d, where = await place()
            assert where.startswith("prior: ")
            version = 0

            async def fresh(congested: dict[str, float]) -> None:
                nonlocal version  # a new version each time: the map never ages in this phase
                version += 1
                await publish(redis_server, mosquitto_server, measured(topology, congested),
                              version)
                await until(lambda: proxy.placement.map_state().version == version)

            for _ in range(4):  # an idle fabric: the decoder on the prefill's leaf
                await fresh({})
                p, d, where = await place()
                assert where.startswith("map v")
                assert d == {"pa": "near", "pb": "far"}[p]
            # near's downlink is saturated: every decode goes to far, from either prefill
            for _ in range(4):
                await fresh({"a2/nic/down": 0.995})
                p, d, where = await place()
                assert d == "far" and where.startswith("map v")
            # no new map for longer than map_stale_s: tier priors again, and said so
            await until(lambda: proxy.placement.map_state().source == "prior", 15.0)
            p, d, where = await place()
            assert where.startswith("prior: congestion map is stale")
            assert d == {"pa": "near", "pb": "far"}[p]
            text = await call("GET", url + "/metrics")
            assert "netkv_proxy_map_stale 1.0" in text
            assert 'netkv_proxy_decisions_total{policy="netkv",source="prior",' in text
            assert 'netkv_proxy_decisions_total{policy="netkv",source="map",' in text
            await asyncio.sleep(0)
        finally:
            await client.close()


async def test_idle_and_slowloris_flood_neither_blocks_a_client_nor_stays_open(
        engines: dict[str, EngineProc], topology: Topology) -> None:
    """Issue 9 item 4: 150 idle sockets + 50 slowloris heads (a byte every 0.2 s) + 10 bodies
    trickled after a full head, with a 12-connection cap and 1 s header/body/keep-alive
    deadlines: the openai client still gets its answer quickly, every flood socket is closed
    by the proxy, and the counters say why."""
    limits = {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "keepalive_timeout_s": 1.0,
              "max_client_connections": 16}
    async with running(engines, topology, **limits) as (proxy, client):
        assert proxy.guard is not None
        port = int(str(client.base_url).rsplit(":", 1)[1].split("/")[0])
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(150)]
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
        body_slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        for _, w in body_slow:
            w.write(head + b"Content-Length: 100\r\n\r\n{")

        async def trickle() -> None:
            for i in range(25):  # bounded: 5 s at most
                for _, w in slow:
                    if not w.is_closing():
                        with contextlib.suppress(OSError):
                            w.write(head[i:i + 1])
                await asyncio.sleep(0.2)

        trickling = asyncio.ensure_future(trickle())
        try:
            await asyncio.sleep(0.3)
            start = time.perf_counter()
            done = await client.completions.create(model=MODEL, prompt="hello " * 20,
                                                   max_tokens=3)
            took = time.perf_counter() - start
            assert done.choices[0].text == text_of(3)
            assert took < 3.0, f"a legitimate request took {took:.2f} s under the flood"

            async def closed(r: asyncio.StreamReader) -> bytes | None:
                """What the proxy sent before closing (None: still open after 4 s)."""
                got = b""
                try:
                    async with asyncio.timeout(4.0):
                        while chunk := await r.read(4096):
                            got += chunk
                except TimeoutError:
                    return None
                except OSError:
                    pass
                return got

            results = await asyncio.gather(*(closed(r) for r, _ in idle + slow + body_slow))
            assert None not in results, f"{results.count(None)} flood sockets still open " \
                f"{results[200:]}"
            # the trickled bodies were answered 408 in OpenAI's shape before the close
            for answer in results[200:]:
                assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
                assert b'"type":"RequestTimeoutError"' in answer and b'"param":"body"' in answer
            g = proxy.guard
            # Nearly all 200 idle/slowloris sockets were closed by the guard (evicted for the
            # cap, or past the header deadline); under load aiohttp's own 1 s keep-alive timer
            # can close an idle one first, which neither counter sees (seen once in CI: 199).
            assert g.evicted_total + g.header_timeouts_total >= 190
            assert len(g.open) <= g.cap
        finally:
            trickling.cancel()
            await asyncio.gather(trickling, return_exceptions=True)
            for _, w in idle + slow + body_slow:
                w.close()
