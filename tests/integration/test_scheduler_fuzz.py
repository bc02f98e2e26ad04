"""Property-based fuzzing of the scheduler's HTTP API from its own OpenAPI document.

Schemathesis generates conforming (positive) and violating (negative) requests for every
operation in ``/openapi.json``; hypothesis adds arbitrary bytes. Whatever arrives, the
service answers within the timeout with no 5xx, and 4xx errors are JSON naming a field.
The app runs on a real socket in a thread of its own (the hypothesis tests are synchronous).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netkv_scheduler.app import create_app
from netkv_scheduler.settings import SchedulerSettings, demo_topology_path
from schemathesis import GenerationMode

from netkv.adapters.topology_file import load_topology
from netkv.core.congestion import CongestionMap
from netkv.routing.mapfeed import MapFeed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


class ThreadedServer:
    """The real scheduler app served from a background thread's event loop."""

    def __init__(self) -> None:
        self.url = ""
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        from aiohttp import web
        topology = load_topology(demo_topology_path())
        feed = MapFeed(topology, None, None, stale_s=3600.0)
        cmap = CongestionMap(topology)
        cmap.version, cmap.created_ts = 1, time.time()
        feed.install(cmap)
        app = create_app(SchedulerSettings(max_body_bytes=64 * 1024, max_block_hashes=64),
                         topology, feed)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        assert self._ready.wait(30), "the scheduler did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    with ThreadedServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def schema(server: ThreadedServer) -> Any:
    doc = requests.get(f"{server.url}/openapi.json", timeout=5).json()
    # Narrow the prefill field to the known instances so that conforming selects reach the
    # decision path (with any string they would all be "unknown instance" 400s).
    prefills = [i["name"] for i in requests.get(f"{server.url}/v1/instances", timeout=5)
                .json()["instances"] if i["role"] == "prefill"]
    select = doc["paths"]["/v1/select"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    select["properties"]["prefill"]["enum"] = prefills
    register = doc["paths"]["/v1/instances"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    register["properties"]["host"]["enum"] = [h.name for h in load_topology(
        demo_topology_path()).hosts]
    return schemathesis.openapi.from_dict(doc)


def check_answer(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if 400 <= response.status_code < 500 and response.request.method == "POST" \
            and response.status_code != 405:
        body = response.json()
        assert isinstance(body.get("error"), str) and isinstance(body.get("field"), str)


OPERATIONS = [("/v1/select", "POST"), ("/v1/release", "POST"), ("/v1/instances", "POST"),
              ("/v1/instances", "GET"), ("/readyz", "GET"), ("/healthz", "GET")]
# Operations without parameters or a body cannot be called in a schema-violating way.
CASES = [(path, method, mode) for path, method in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if method == "POST" or mode is GenerationMode.POSITIVE]


@pytest.mark.parametrize(("path", "method", "mode"), CASES)
def test_no_5xx_for_generated_requests(server: ThreadedServer, schema: Any, path: str,
                                       method: str, mode: GenerationMode) -> None:
    operation = schema[path][method]
    session = requests.Session()
    statuses: list[int] = []

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=server.url, session=session, timeout=5)
        check_answer(response)
        statuses.append(response.status_code)
        if path == "/v1/select" and response.status_code == 200:  # a real, listed decoder
            listed = session.get(f"{server.url}/v1/instances", timeout=5).json()["instances"]
            decoders = {i["name"] for i in listed if i["role"] == "decode"}
            assert response.json()["decode"] in decoders, response.text[:300]

    run()
    if mode is GenerationMode.POSITIVE and path == "/v1/select":
        assert statuses and all(code == 200 for code in statuses), set(statuses)
    elif mode is GenerationMode.POSITIVE:  # e.g. a new instance without role: a 400
        assert 200 in statuses, set(statuses)
    else:
        assert any(400 <= code < 500 for code in statuses), set(statuses)


@FUZZ
@given(body=st.binary(max_size=2048) | st.text(max_size=512).map(str.encode),
       path=st.sampled_from(["/v1/select", "/v1/release", "/v1/instances"]))
def test_no_5xx_for_arbitrary_bytes(server: ThreadedServer, body: bytes, path: str) -> None:
    response = requests.post(f"{server.url}{path}", data=body, timeout=5,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["field"].startswith("body")


def test_oversized_body_is_413_not_a_dropped_connection(server: ThreadedServer) -> None:
    body = b'{"request_id": "' + b"x" * (128 * 1024) + b'"}'
    response = requests.post(f"{server.url}/v1/release", data=body, timeout=5)
    assert response.status_code == 413 and response.json()["field"] == "body"


def test_deeply_nested_json_is_400(server: ThreadedServer) -> None:
    body = b"[" * 30000 + b"]" * 30000
    response = requests.post(f"{server.url}/v1/select", data=body, timeout=5,
                             headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 413)
