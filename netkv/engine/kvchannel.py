"""The KV side channel: where a prefill holds KV for a remote decode, and how it is read.

vLLM's NixlConnector has the decode *read* the prefill's blocks (RDMA) after a handshake on
the prefill's side channel (``VLLM_NIXL_SIDE_CHANNEL_PORT``), and then notify the prefill,
which frees them; blocks nobody reads are freed when their lease (``kv_lease_duration``,
30 s) runs out. Without RDMA NICs the emulation moves the same (scaled) bytes over TCP on that
port, so they cross the emulated fabric's shaped links:

* pull (NIXL READ): the decode sends ``{"op": "read", "request_id", "block_ids"}`` (the
  blocks it lacks), the prefill answers ``{"ok": true, "nbytes": N}`` and N bytes, the decode
  answers ``{"op": "done"}`` and the lease ends;
* bootstrap (SGLang): the decode sends ``{"op": "register", "room", "skip_blocks"}`` before or
  while the prefill computes; when the prefill of that room is done it sends the bytes on the
  same connection (the prefill pushes, as SGLang's Mooncake backend does).

Every line is one JSON object; a header longer than ``HEADER_LIMIT`` bytes is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from netkv.testbed.netns import inside

log = structlog.get_logger(__name__)

CHUNK = 256 * 1024
_ZEROS = bytes(CHUNK)
HEADER_LIMIT = 1 << 20  # block id lists of long prompts


class KVChannelError(RuntimeError):
    """The side channel refused or broke a transfer."""


def _inside(ns: str | None) -> contextlib.AbstractContextManager[None]:
    if ns is None:
        return contextlib.nullcontext()
    return inside(ns)


def listening_socket(ns: str | None, address: str, port: int = 0) -> socket.socket:
    """A listening TCP socket that lives in network namespace ``ns`` (None: this one)."""
    with _inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(512)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def connect_from(ns: str | None, address: str, port: int, timeout_s: float = 10.0
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection opened from namespace ``ns``."""
    with _inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=HEADER_LIMIT)


@dataclass(slots=True)
class Lease:
    """KV a prefill holds for a remote decode."""

    request_id: str
    tokens: int
    block_tokens: int
    first_block: int
    n_blocks: int
    expires_s: float
    room: int | None = None

    @property
    def block_ids(self) -> list[int]:
        return list(range(self.first_block, self.first_block + self.n_blocks))

    def tokens_of(self, block_ids: list[int] | None) -> int:
        """Prompt tokens in the given blocks of this lease (all when ``None``)."""
        if block_ids is None:
            return self.tokens
        total = 0
        last = self.first_block + self.n_blocks - 1
        for b in set(block_ids):
            if self.first_block <= b <= last:
                total += self.block_tokens if b < last else \
                    self.tokens - self.block_tokens * (self.n_blocks - 1)
        return total


@dataclass
class KVStore:
    """The prefill side: leases by request id and by bootstrap room."""

    lease_s: float
    clock: Callable[[], float] = time.monotonic
    leases: dict[str, Lease] = field(default_factory=dict)
    rooms: dict[int, asyncio.Future[Lease]] = field(default_factory=dict)
    expired_total: int = 0
    _next_block: int = 0

    def hold(self, request_id: str, tokens: int, block_tokens: int,
             room: int | None = None) -> Lease:
        n_blocks = max(1, -(-tokens // block_tokens))
        lease = Lease(request_id, tokens, block_tokens, self._next_block, n_blocks,
                      self.clock() + self.lease_s, room)
        self._next_block = (self._next_block + n_blocks) % (1 << 40)
        old = self.leases.pop(request_id, None)
        if old is not None:
            self._drop_room(old)
        self.leases[request_id] = lease
        if room is not None:
            fut = self.rooms.get(room)
            if fut is None or fut.done():
                fut = self.rooms[room] = asyncio.get_running_loop().create_future()
            fut.set_result(lease)
        return lease

    def room(self, room: int) -> asyncio.Future[Lease]:
        fut = self.rooms.get(room)
        if fut is None:
            fut = self.rooms[room] = asyncio.get_running_loop().create_future()
        return fut

    def get(self, request_id: str) -> Lease | None:
        lease = self.leases.get(request_id)
        if lease is not None and lease.expires_s < self.clock():
            self.release(lease)
            self.expired_total += 1
            return None
        return lease

    def release(self, lease: Lease) -> None:
        if self.leases.get(lease.request_id) is lease:
            del self.leases[lease.request_id]
        self._drop_room(lease)

    def _drop_room(self, lease: Lease) -> None:
        if lease.room is not None:
            fut = self.rooms.get(lease.room)
            if fut is not None and fut.done() and fut.result() is lease:
                del self.rooms[lease.room]

    def sweep(self) -> int:
        """Drop expired leases (KV nobody read in time); returns how many."""
        now = self.clock()
        dead = [lease for lease in self.leases.values() if lease.expires_s < now]
        for lease in dead:
            self.release(lease)
        self.expired_total += len(dead)
        for room, fut in list(self.rooms.items()):  # registrations nobody answered
            if fut.done() and fut.result().request_id not in self.leases:
                del self.rooms[room]
        return len(dead)

    @property
    def held_tokens(self) -> int:
        return sum(lease.tokens for lease in self.leases.values())


class SideChannel:
    """The prefill's TCP side channel (async context manager)."""

    def __init__(self, store: KVStore, bytes_per_token: float, *, ns: str | None,
                 host: str, port: int = 0,
                 on_served: Callable[[int, float], None] = lambda nbytes, seconds: None
                 ) -> None:
        self.store = store
        self.bytes_per_token = bytes_per_token
        self.ns, self.host, self.port = ns, host, port
        self.on_served = on_served
        self.errors_total = 0
        self.open_connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SideChannel:
        sock = listening_socket(self.ns, self.host, self.port)
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=HEADER_LIMIT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        lease: Lease | None = None
        try:
            async with asyncio.timeout(30.0):
                header = json.loads(await reader.readline())
            if not isinstance(header, dict):
                raise KVChannelError("header is not a JSON object")
            op = header.get("op")
            if op == "read":
                lease = self.store.get(str(header.get("request_id")))
                if lease is None:
                    await _reply(writer, {"ok": False, "error": "unknown or expired request"})
                    return
                ids = header.get("block_ids")
                skip = max(int(header.get("skip_blocks", 0)), 0)
                tokens = lease.tokens_of([int(b) for b in ids] if isinstance(ids, list)
                                         else lease.block_ids[skip:])
            elif op == "register":
                room = int(header["room"])
                async with asyncio.timeout(self.store.lease_s):
                    lease = await asyncio.shield(self.store.room(room))
                skip = max(int(header.get("skip_blocks", 0)), 0)
                tokens = lease.tokens_of(lease.block_ids[skip:])
            else:
                raise KVChannelError(f"unknown op {op!r}")
            nbytes = round(tokens * self.bytes_per_token)
            start = time.monotonic()
            await _reply(writer, {"ok": True, "nbytes": nbytes, "tokens": tokens})
            left = nbytes
            while left > 0:
                n = min(left, CHUNK)
                writer.write(_ZEROS[:n])
                await writer.drain()
                left -= n
            async with asyncio.timeout(30.0):
                done = await reader.readline()
            if done:
                self.on_served(nbytes, time.monotonic() - start)
                self.store.release(lease)
        except (OSError, ValueError, KeyError, TypeError, TimeoutError, KVChannelError) as exc:
            self.errors_total += 1
            log.warning("kv side channel: transfer failed", error=repr(exc))
        finally:
            self.open_connections -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj).encode() + b"\n")
    await writer.drain()


@dataclass(frozen=True, slots=True)
class Transfer:
    nbytes: int
    tokens: int
    seconds: float


async def _receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Transfer:
    start = time.monotonic()
    head = json.loads(await reader.readline() or b"{}")
    if not head.get("ok"):
        raise KVChannelError(str(head.get("error", "side channel closed")))
    left = int(head["nbytes"])
    total = left
    while left > 0:
        chunk = await reader.read(min(left, CHUNK))
        if not chunk:
            raise KVChannelError(f"KV stream closed with {left} bytes missing")
        left -= len(chunk)
    writer.write(b'{"op": "done"}\n')
    await writer.drain()
    return Transfer(total, int(head.get("tokens", 0)), time.monotonic() - start)


async def _exchange(ns: str | None, host: str, port: int, header: dict[str, Any],
                    timeout_s: float) -> Transfer:
    async with asyncio.timeout(timeout_s):
        reader, writer = await connect_from(ns, host, port, timeout_s)
        try:
            writer.write(json.dumps(header).encode() + b"\n")
            await writer.drain()
            return await _receive(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def pull(ns: str | None, host: str, port: int, request_id: str, *,
               block_ids: list[int] | None, skip_blocks: int = 0,
               timeout_s: float = 60.0) -> Transfer:
    """Read a remote prefill's KV blocks (without ``block_ids``: all but the first
    ``skip_blocks``, as in vLLM's push flow where the decode is not told the ids)."""
    return await _exchange(ns, host, port, {"op": "read", "request_id": request_id,
                                            "block_ids": block_ids,
                                            "skip_blocks": skip_blocks}, timeout_s)


async def register(ns: str | None, host: str, port: int, room: int, *, skip_blocks: int,
                   timeout_s: float = 60.0) -> Transfer:
    """Meet a prefill at its bootstrap address; returns once its KV has arrived."""
    return await _exchange(ns, host, port, {"op": "register", "room": room,
                                            "skip_blocks": skip_blocks}, timeout_s)
