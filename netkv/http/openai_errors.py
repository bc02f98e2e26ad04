"""Errors in OpenAI's shape as aiohttp responses, for every OpenAI-compatible server NetKV
runs (the emulated engines and the proxy): ``{"error": {"message", "type", "param",
"code"}}`` with ``code`` the HTTP status (the body itself is
:func:`netkv.contracts.openai.error_body`)."""

from __future__ import annotations

from aiohttp import web

from netkv.contracts.openai import error_body


def openai_error(status: int, message: str, type_: str, param: str | None = None, *,
                 headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(message, type_, param=param,
                                                       code=status),
                        content_type="application/json", headers=headers)
