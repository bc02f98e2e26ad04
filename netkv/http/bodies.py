"""Typed JSON bodies: one msgspec Struct per body, decoded and encoded here.

:func:`read_body` reads a request body (bounded in time) and decodes it straight into its
Struct; every failure is an :class:`~netkv.errors.InputError` naming the field the way the
API reports it (``body.block_hashes[1]``, ``body.prompt_tokens``), which the error middleware
turns into a 400 JSON answer and counts.
"""

from __future__ import annotations

import asyncio
import re
import select
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from netkv.errors import InputError

T = TypeVar("T")

_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_FIELD = re.compile(r"^Object (?:missing required|contains unknown) field `(?P<name>[^`]*)`$")
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}
_encoder = msgspec.json.Encoder()


class BodyTimeoutError(InputError):
    """The body did not arrive in time (answered 408)."""


def decode_error(exc: msgspec.DecodeError, root: str = "body") -> InputError:
    """A msgspec error as an InputError whose ``where`` is the field path under ``root``."""
    text = str(exc)
    where = root
    match = _AT.match(text)
    if match:
        text, where = match["msg"], root + match["path"]
    if not isinstance(exc, msgspec.ValidationError):
        return InputError(root, f"not valid JSON: {text[:120]}")
    field = _FIELD.match(text)
    if field:
        where = f"{where}.{field['name'][:64]}"
        text = "missing required field" if "missing" in text else "unknown field"
    return InputError(where, text[:200])


def decode(raw: bytes, type_: type[T], root: str = "body") -> T:
    """Decode JSON ``raw`` into ``type_`` (cached decoder per type)."""
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        return decoder.decode(raw)  # type: ignore[no-any-return]
    except msgspec.DecodeError as exc:
        raise decode_error(exc, root) from None


async def read_body(request: web.Request, type_: type[T], *, timeout_s: float = 10.0) -> T:
    """Read the body within ``timeout_s`` (a trickled body is a 408) and decode it."""
    if request.content.is_eof():  # all of it arrived with the head: nothing to wait for
        return decode(await request.read(), type_)
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise BodyTimeoutError("body", f"not received within {timeout_s:g} s") from None
    return decode(raw, type_)


_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR


def peer_gone(request: web.Request) -> bool:
    """True when the client has closed its side (or the connection broke) before we answer.

    An HTTP/1.1 client that waits for an answer does not half-close, so a FIN (POLLRDHUP)
    means it gave up (timed out during a stall, say). One non-blocking poll(2), no data read.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), _GONE)
    ready = poller.poll(0)  # one fd registered: at most one entry
    return bool(ready) and bool(ready[0][1] & _GONE)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def json_response(obj: Any, status: int = 200) -> web.Response:
    """A JSON answer from a Struct, a dataclass or plain data."""
    return web.Response(body=_encoder.encode(obj), status=status,
                        content_type="application/json")
