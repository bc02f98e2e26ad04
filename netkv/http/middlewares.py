"""The middlewares every NetKV server runs, outermost first (see :func:`middlewares`).

* errors: every error is JSON ``{"error": ..., "field": ...}`` with its status, 404 and 405
  included; bad input (:class:`~netkv.errors.InputError`) is a 400 naming the field and is
  counted through ``on_bad(field)``; an unexpected exception is a 500 whose log line is
  rate-limited (a flood costs a few lines, not a disk);
* auth: with a token, every mutating method (anything but GET/HEAD/OPTIONS) needs
  ``Authorization: Bearer <token>`` (constant-time compare), else 401;
* JSON only: a body-carrying request must say ``Content-Type: application/json``, else 415
  (a web page cannot post a "simple" ``text/plain`` request to steer decisions);
* body limit: a declared ``Content-Length`` above the limit is a 413 before any byte is read
  (aiohttp's ``client_max_size`` catches undeclared, chunked ones).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import SecretStr

from netkv.errors import InputError
from netkv.http.bodies import BodyTimeoutError, json_response
from netkv.http.ratelimit import RateLimitedLog

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_log = RateLimitedLog(__name__)
_FIELD_OF_STATUS = {401: "auth", 404: "path", 405: "method", 408: "body", 413: "body",
                    415: "content-type"}


def error_response(status: int, field: str, message: str) -> web.Response:
    resp = json_response({"error": f"{field}: {message}" if field else message,
                          "field": field}, status)
    if status == 401:
        resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


def errors(on_bad: Callable[[str], None] | None = None) -> Middleware:
    """JSON errors for every status; ``on_bad(field)`` counts each rejected request."""
    def bad(field: str) -> None:
        if on_bad is not None:
            on_bad(field)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BodyTimeoutError as exc:
            bad(exc.where)
            return error_response(408, exc.where, exc.message)
        except InputError as exc:
            bad(exc.where)
            return error_response(400, exc.where, exc.message)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            field = _FIELD_OF_STATUS.get(exc.status, "")
            if exc.status in (401, 413, 415):
                bad(field)
            text = exc.text or ""
            message = exc.reason if not text or text.startswith(f"{exc.status}:") else text
            resp = error_response(exc.status, field, message)
            if exc.status == 405 and "Allow" in exc.headers:
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        except Exception as exc:  # an unexpected fault: answer, log a bounded amount
            _log.error("request failed", path=request.path, error=repr(exc)[:300])
            return error_response(500, "", "internal error")
    return middleware


def bearer_auth(token: SecretStr | str | None) -> Middleware:
    """401 unless a mutating request carries ``Authorization: Bearer <token>``."""
    secret = (token.get_secret_value() if isinstance(token, SecretStr) else token)
    expected = secret.encode() if secret else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.method not in SAFE_METHODS:
            given = request.headers.get("Authorization", "")
            if not (given.startswith("Bearer ")
                    and hmac.compare_digest(given[7:].encode(), expected)):
                raise web.HTTPUnauthorized(text="missing or wrong bearer token")
        return await handler(request)
    return middleware


def json_only(max_body_bytes: int) -> Middleware:
    """415 unless a body-carrying request is ``application/json``; 413 past the limit."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in SAFE_METHODS:
            length = request.content_length
            if length is not None and length > max_body_bytes:
                raise web.HTTPRequestEntityTooLarge(max_size=max_body_bytes,
                                                    actual_size=length)
            if request.content_type != "application/json" and (length or request.can_read_body):
                raise web.HTTPUnsupportedMediaType(
                    text=f"expected application/json, got {request.content_type[:64]!r}")
        return await handler(request)
    return middleware


def middlewares(*, token: SecretStr | str | None, max_body_bytes: int,
                on_bad: Callable[[str], None] | None = None) -> list[Middleware]:
    """The standard stack, outermost first: errors, auth, JSON only + body limit."""
    return [errors(on_bad), bearer_auth(token), json_only(max_body_bytes)]
