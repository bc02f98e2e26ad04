"""Emulated inference engines that move real KV bytes over the emulated fabric.

There are no GPUs here, so compute is modelled (a prefill takes ``overhead + tokens / rate``
seconds on a FIFO instance; a decode step takes ``decode_step_s``) and everything else is
real: the decode instance is chosen by the real scheduler over HTTP, and the (scaled) KV cache
crosses the shaped veths as a TCP stream from the prefill host's namespace to the decode
host's namespace. All engines live in one process (each socket is opened inside its host's
namespace), so every timestamp comes from one monotonic clock and TTFT is end to end:
arrival -> prefill queue -> prefill -> decision -> KV transfer -> first decode step.

Wire format of a KV transfer: one JSON header line ``{"request_id", "nbytes"}``, then
``nbytes`` raw bytes; the decode engine answers one JSON line once the last byte arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import structlog

from netkv.engine.model import EngineModel
from netkv.testbed.netns import inside

log = structlog.get_logger(__name__)

__all__ = ["EngineModel", "Outcome", "Request"]

CHUNK = 64 * 1024
_ZEROS = bytes(CHUNK)
HEADER_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Request:
    """One replayed trace request."""

    request_id: str
    arrival_s: float  # offset from the start of the replay
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    decode: str
    predicted_ttft_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class DecodeTarget(Protocol):
    """Where a prefill engine ships a KV cache: a local :class:`DecodeEngine` or a remote
    one (:class:`RemoteDecoder`)."""

    address: str
    port: int

    def expect(self, request_id: str, prompt_tokens: int, output_tokens: int) -> None: ...


@dataclass(slots=True)
class RemoteDecoder:
    """A decode engine in another process or container."""

    address: str
    port: int

    def expect(self, request_id: str, prompt_tokens: int, output_tokens: int) -> None:
        """Nothing to do here: the KV header carries the token counts."""


class Selector(Protocol):
    """Who picks the decode instance: the scheduler service (HTTP) in the testbed."""

    async def select(self, request: Request, prefill: str, policy: str) -> Decision: ...
    async def release(self, request_id: str, decode: str) -> None: ...
    async def report_load(self, decode: str, running: int, waiting: int,
                          kv_use: float) -> None: ...


@dataclass(slots=True)
class Outcome:
    """What happened to one request, on one clock (seconds since the replay started)."""

    request_id: str
    prefill: str
    decode: str = ""
    policy: str = ""
    prompt_tokens: int = 0
    kv_bytes: int = 0
    arrival_s: float = 0.0
    prefill_start_s: float = 0.0
    transfer_start_s: float = 0.0
    transfer_end_s: float = 0.0
    first_token_s: float = 0.0
    predicted_ttft_s: float | None = None
    error: str | None = None

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def transfer_s(self) -> float:
        return self.transfer_end_s - self.transfer_start_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ttft_s"] = self.ttft_s
        d["transfer_s"] = self.transfer_s
        return d


def listening_socket(ns: str | None, address: str, port: int = 0) -> socket.socket:
    """A listening TCP socket that lives in namespace ``ns``."""
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def connect_from(ns: str | None, address: str, port: int, timeout_s: float = 10.0
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection opened from namespace ``ns``."""
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (address, port)),
                               timeout_s)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


class DecodeEngine:
    """Receives KV caches; the first token is one decode step after the last byte (or after
    a slot frees up when all ``decode_slots`` are busy)."""

    def __init__(self, name: str, ns: str | None, address: str, *, model: EngineModel,
                 clock: Callable[[], float],
                 on_done: Callable[[str, str], Awaitable[None]],
                 on_load: Callable[[DecodeEngine], None] = lambda engine: None) -> None:
        self.name, self.ns, self.address = name, ns, address
        self.model = model
        self.clock = clock
        self.on_done = on_done
        self.on_load = on_load
        self.port = 0
        self.slots = asyncio.Semaphore(model.decode_slots)
        self.errors = 0
        self.running = 0  # requests decoding
        self.waiting = 0  # KV received or announced, no slot yet
        self.kv_tokens = 0.0  # KV memory held, in tokens
        self._server: asyncio.Server | None = None
        self._holds: set[asyncio.Task[None]] = set()
        self._expected: dict[str, tuple[int, int]] = {}

    @property
    def kv_use(self) -> float:
        return min(self.kv_tokens / self.model.capacity_tokens, 1.0)

    def expect(self, request_id: str, prompt_tokens: int, output_tokens: int) -> None:
        """A prefill chose this decoder; the request counts as waiting until it decodes."""
        self._expected[request_id] = (prompt_tokens, output_tokens)
        self.waiting += 1
        self.on_load(self)

    async def start(self, port: int = 0) -> None:
        sock = listening_socket(self.ns, self.address, port)
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._serve, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        for task in list(self._holds):
            task.cancel()
        if self._holds:
            await asyncio.wait(self._holds, timeout=2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = json.loads(await asyncio.wait_for(reader.readline(), 30.0))
            request_id, left = str(header["request_id"]), int(header["nbytes"])
            if request_id not in self._expected:  # a remote prefill: not announced
                self.waiting += 1
            while left > 0:
                chunk = await asyncio.wait_for(reader.read(min(left, CHUNK)), 60.0)
                if not chunk:
                    raise ConnectionError(f"KV stream closed with {left} bytes missing")
                left -= len(chunk)
            arrived = self.clock()
            prompt, output = self._expected.pop(request_id, (
                int(header.get("prompt_tokens", 0)), int(header.get("output_tokens", 1))))
            await self.slots.acquire()
            self.waiting = max(self.waiting - 1, 0)
            self.running += 1
            self.kv_tokens += prompt + output
            self.on_load(self)
            await asyncio.sleep(self.model.decode_step_s)
            first = self.clock()
            writer.write(json.dumps({"arrived_s": arrived, "first_token_s": first}).encode()
                         + b"\n")
            await writer.drain()
            hold = min(output * self.model.tpot_s, self.model.max_decode_hold_s)
            task = asyncio.create_task(self._hold(request_id, hold, prompt + output))
            self._holds.add(task)
            task.add_done_callback(self._holds.discard)
        except (OSError, ValueError, KeyError, TimeoutError, ConnectionError) as exc:
            self.errors += 1
            log.warning("decode.bad_transfer", engine=self.name, error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _hold(self, request_id: str, seconds: float, tokens: int) -> None:
        try:
            await asyncio.sleep(seconds)
        finally:
            self.slots.release()
            self.running -= 1
            self.kv_tokens -= tokens
        self.on_load(self)
        await self.on_done(request_id, self.name)


class PrefillEngine:
    """One prefill instance: FIFO over its requests, then ships the KV cache to the decode
    instance the selector chose."""

    def __init__(self, name: str, ns: str | None, model: EngineModel,
                 clock: Callable[[], float]) -> None:
        self.name, self.ns = name, ns
        self.model = model
        self.clock = clock
        self._busy = asyncio.Lock()

    def kv_bytes(self, tokens: int) -> int:
        """The KV size moved on the testbed (``model.bytes_per_token`` is already scaled)."""
        return max(1, round(tokens * self.model.bytes_per_token))

    async def serve(self, request: Request, policy: str, selector: Selector,
                    decoders: Mapping[str, DecodeTarget], timeout_s: float = 120.0) -> Outcome:
        out = Outcome(request.request_id, self.name, policy=policy,
                      prompt_tokens=request.prompt_tokens, arrival_s=self.clock(),
                      kv_bytes=self.kv_bytes(request.prompt_tokens))
        try:
            async with asyncio.timeout(timeout_s):
                async with self._busy:
                    out.prefill_start_s = self.clock()
                    decision = await selector.select(request, self.name, policy)
                    out.decode, out.predicted_ttft_s = decision.decode, decision.predicted_ttft_s
                    target = decoders[decision.decode]
                    target.expect(request.request_id, request.prompt_tokens,
                                  request.output_tokens)
                    remaining = self.model.prefill_s(request.prompt_tokens) - (
                        self.clock() - out.prefill_start_s)
                    await asyncio.sleep(max(remaining, 0.0))
                await self._ship(out, target, request.output_tokens)
        except Exception as exc:  # recorded per request; one failure never stops a replay
            out.error = f"{type(exc).__name__}: {exc}"
            log.warning("prefill.failed", request=request.request_id, error=out.error)
        return out

    async def _ship(self, out: Outcome, target: DecodeTarget, output_tokens: int) -> None:
        out.transfer_start_s = self.clock()
        reader, writer = await connect_from(self.ns, target.address, target.port)
        try:
            writer.write(json.dumps({"request_id": out.request_id, "nbytes": out.kv_bytes,
                                     "prompt_tokens": out.prompt_tokens,
                                     "output_tokens": output_tokens}).encode() + b"\n")
            left = out.kv_bytes
            while left > 0:
                n = min(left, CHUNK)
                writer.write(_ZEROS[:n])
                await writer.drain()
                left -= n
            reply = json.loads(await reader.readline())
            out.transfer_end_s = float(reply["arrived_s"])
            out.first_token_s = float(reply["first_token_s"])
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
