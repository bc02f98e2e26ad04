"""The scheduler's recent decisions, for the oracle's live view: ``GET /v1/decisions/recent``.

:func:`install` (one call from ``create_app``) keeps the last :data:`KEEP` answers of
``POST /v1/select`` as they leave (their bytes only, so the decision path pays one append:
the scheduler's handler calls a :func:`keeper` itself; any other app's answers are taken from the
response-prepare signal) and serves them decoded, newest first, with the fields a viewer
needs. Read-only and free of secrets; it carries ``Access-Control-Allow-Origin: *`` so that the
oracle's page (another port) may read it.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

KEEP = 200
FIELDS = ("request_id", "prefill", "decode", "decode_host", "tier", "predicted_ttft_ms",
          "policy", "map_version", "map_stale")


class Recent:
    """The kept answers: (unix time, response body), oldest first."""

    def __init__(self) -> None:
        self.items: deque[tuple[float, bytes]] = deque(maxlen=KEEP)


RECENT: web.AppKey[Recent] = web.AppKey("recent_decisions", Recent)


def keeper(app: web.Application) -> Callable[[bytes], None]:
    """What keeps one answer of ``POST /v1/select`` in ``app`` (installed already; a handler
    that calls it installs with ``signal=False``), bound once for the hot path."""
    items = app[RECENT].items
    clock = time.time

    def keep(body: bytes) -> None:
        items.append((clock(), body))
    return keep


async def _keep(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/v1/select" and response.status == 200 \
            and isinstance(response, web.Response) and isinstance(response.body, bytes):
        request.app[RECENT].items.append((time.time(), response.body))


def _decoded(at: float, body: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    out = {k: answer.get(k) for k in FIELDS}
    out["transfer_ms"] = (answer.get("breakdown") or {}).get("transfer_ms")
    out["at"] = at
    return out


async def recent(request: web.Request) -> web.Response:
    raw = request.query.get("limit", "50")
    limit = int(raw) if raw.isdigit() else 50
    kept = list(request.app[RECENT].items)[-max(1, min(limit, KEEP)):]
    items = [d for d in (_decoded(at, body) for at, body in reversed(kept)) if d is not None]
    return web.json_response({"decisions": items, "now": time.time()},
                             headers={"Access-Control-Allow-Origin": "*"})


def install(app: web.Application, *, signal: bool = True) -> None:
    """Serve the recent answers; ``signal`` takes them from every ``/v1/select`` response
    as it is prepared (off: the select handler calls a :func:`keeper`, which spares every
    response of the app a signal dispatch)."""
    app[RECENT] = Recent()
    if signal:
        app.on_response_prepare.append(_keep)
    app.router.add_get("/v1/decisions/recent", recent)


__all__ = ["install", "keeper"]
