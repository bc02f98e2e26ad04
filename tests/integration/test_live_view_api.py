"""The live view's HTTP side over real sockets: the page and its assets, the state it draws
(a link made hot in the map shows as such), bad input named, the SSE stream, and the
scheduler's recent-decisions endpoint the page reads."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from netkv_oracle.api import ApiState, build_app
from netkv_oracle.metrics import OracleMetrics
from netkv_oracle.view import STALE_S, state_json
from netkv_scheduler import decisions

from netkv.core.congestion import CongestionMap
from netkv.core.topology_file import load_topology
from netkv.up import demo_topology_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def hot_map() -> CongestionMap:
    topo = load_topology(demo_topology_path())
    cmap = CongestionMap(topo)
    link = topo.link_index["h002/nic/down"]
    now = time.time()
    cmap.observe_link(link, 0.95 * float(topo.capacity[link]), now)
    cmap.version, cmap.created_ts = 7, now
    return cmap


async def test_page_state_and_events_show_the_hot_link() -> None:
    cmap = hot_map()
    state = ApiState(lambda: cmap, lambda: (True, "leader"), lambda: (True, "ok"),
                     OracleMetrics())
    async with TestServer(build_app(state)) as server, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{server.port}"
        async with http.get(f"{base}/view") as r:
            html = await r.text()
            assert r.status == 200 and "/view/static/view.js" in html
            assert "http" not in html.replace("http://127.0.0.1:8090", "")  # no CDN
        for name in ("view.js", "view.css"):
            async with http.get(f"{base}/view/static/{name}") as r:
                assert r.status == 200 and len(await r.read()) > 500
        async with http.get(f"{base}/view/static/..%2Fapi.py") as r:
            assert r.status == 404
        async with http.get(f"{base}/view/state", params={"tokens": "12000"}) as r:
            body = await r.json()
        links = {link["name"]: link for link in body["links"]}
        assert links["h002/nic/down"]["share"] >= body["hot_share"]
        assert links["h003/nic/down"]["confidence"] == 0  # never measured: the prior
        hosts = [h["name"] for h in body["topology"]["hosts"]]
        into_hot = body["transfer_ms"][hosts.index("h000")][hosts.index("h002")]
        into_quiet = body["transfer_ms"][hosts.index("h000")][hosts.index("h003")]
        assert into_hot > 2 * into_quiet  # the same tier, but behind the hot link
        assert body["version"] == 7 and body["stale"] is False
        async with http.get(f"{base}/view/state", params={"tokens": "lots"}) as r:
            assert r.status == 400 and (await r.json())["field"] == "tokens"
        async with http.get(f"{base}/view/events") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            line = b""
            while not line.startswith(b"data: "):
                line = await r.content.readline()
            event = json.loads(line[len(b"data: "):])
            assert event["version"] == 7


def test_an_old_map_is_called_stale() -> None:
    cmap = hot_map()
    assert state_json(cmap, 1000)["stale"] is False
    cmap.created_ts = time.time() - STALE_S - 1
    body = state_json(cmap, 1000)
    assert body["stale"] is True and body["age_s"] > STALE_S


async def test_the_scheduler_keeps_its_recent_decisions_for_the_view() -> None:
    app = web.Application()

    async def select(request: web.Request) -> web.Response:
        n = int(request.query["n"])
        return web.json_response({"request_id": f"r{n}", "decode": "h001-d1", "tier": 1,
                                  "breakdown": {"transfer_ms": 80.5}, "secret": "no"})
    app.router.add_post("/v1/select", select)
    decisions.install(app)
    async with TestServer(app) as server, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{server.port}"
        for n in range(decisions.KEEP + 5):
            async with http.post(f"{base}/v1/select", params={"n": str(n)}) as r:
                await r.read()
        async with http.get(f"{base}/v1/decisions/recent", params={"limit": "3"}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            body = await r.json()
    got = body["decisions"]
    assert [d["request_id"] for d in got] == [f"r{decisions.KEEP + 4 - i}" for i in range(3)]
    assert got[0]["transfer_ms"] == 80.5 and "secret" not in got[0]
