"""Fixtures that start real servers on free loopback ports and tear them down."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from netkv.localservers import MosquittoServer, RedisServer

SHARED_TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / \
    "mooncake_conversation_trace.jsonl"


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server on a free loopback port (function scope: tests may restart it)."""
    async with RedisServer(workdir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def mosquitto_server(tmp_path: Path) -> AsyncIterator[MosquittoServer]:
    """A real mosquitto broker on a free loopback port."""
    async with MosquittoServer(workdir=tmp_path / "mosquitto") as server:
        yield server


@pytest.fixture
def shared_trace() -> Path:
    """The Mooncake conversation trace beside the project (skips with a reason if absent)."""
    if not SHARED_TRACE.exists():
        pytest.skip(f"shared trace not found at {SHARED_TRACE}")
    return SHARED_TRACE


@pytest.fixture(autouse=True)
def _collect_garbage_per_test() -> Iterator[None]:
    """Collect after each test so a leaked socket or file fails the test that leaked it,
    not whichever later test happens to trigger the garbage collector."""
    yield
    gc.collect()
