"""The measured TTFT breakdown and the decode-choice ceiling of a router comparison, and how
the engines' timestamps are attached to the client's outcomes (pure)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from netkv.testbed.breakdown import ceiling, measured
from netkv.testbed.client import identify
from netkv.testbed.compare import _attach_phases
from netkv.testbed.engines import Outcome

PHASES = {"prefill.received": 0.1, "prefill.compute_start": 0.3, "prefill.compute_end": 0.8,
          "prefill.answered": 0.8, "decode.received": 0.85, "decode.kv_start": 0.86,
          "decode.kv_end": 1.06, "decode.first_write": 1.1}


def row(router: str, **extra: Any) -> dict[str, Any]:
    return {"router": router, "error": None, "arrival_s": 0.0, "first_token_s": 1.12,
            "ttft_s": 1.12, "kv_bytes": 500_000, "transfer_s": 0.2,
            "phases": dict(PHASES), **extra}


def test_measured_terms_add_up_to_the_ttft() -> None:
    got = measured([row("a"), row("a"), row("b", error="HTTP 502")])
    assert set(got) == {"a"}  # failed requests are left out
    a = got["a"]
    assert a["leg1"] == pytest.approx(100) and a["pqueue"] == pytest.approx(200)
    assert a["compute"] == pytest.approx(500) and a["turn"] == pytest.approx(50)
    assert a["kvwait"] == pytest.approx(10) and a["kv"] == pytest.approx(200)
    assert a["after"] == pytest.approx(60)
    terms = ("leg1", "pqueue", "compute", "turn", "kvwait", "kv", "after")
    assert sum(a[k] for k in terms) == pytest.approx(a["ttft"])
    assert a["n"] == 2


def test_measured_skips_terms_without_both_ends() -> None:
    got = measured([row("a", phases={})])["a"]
    assert got["ttft"] == pytest.approx(1120)
    assert got["kv"] != got["kv"]  # NaN: no engine timestamps at all


def test_ceiling_moves_every_transfer_at_the_nic_rate() -> None:
    # 500 kB at 5 MB/s is 0.1 s: a 0.2 s transfer could have been 0.1 s shorter
    got = ceiling([row("a"), row("a", kv_bytes=0, transfer_s=0.0)], nic_bytes_s=5e6)["a"]
    assert got["mean"] == pytest.approx(1120)
    assert got["ideal_mean"] == pytest.approx(1e3 * (1.02 + 1.12) / 2)
    assert got["nokv_mean"] == pytest.approx(1e3 * (0.92 + 1.12) / 2)
    assert got["kv_share"] == pytest.approx(0.1 / 1.12)
    assert got["ideal_mean"] / got["mean"] < 1.0


def test_phases_are_found_by_the_id_the_engines_saw() -> None:
    out = Outcome("r1", "")
    identify(out, {}, b'data: {"id": "netkv-r1", "choices": []}\n', {}, 0.0)
    assert out.upstream_id == "netkv-r1"
    other = Outcome("r2", "")
    engines = [SimpleNamespace(settings=SimpleNamespace(role="prefill"),
                               timeline={"netkv-r1": {"received": 10.5}, "x": {"a": 1.0}}),
               SimpleNamespace(settings=SimpleNamespace(role="decode"),
                               timeline={"netkv-r1": {"kv_start": 11.0}})]
    _attach_phases([out, other], engines, 10.0)
    assert out.phases == {"prefill.received": 0.5, "decode.kv_start": 1.0}
    assert other.phases == {}


def test_the_proxy_decision_headers_are_kept() -> None:
    out = Outcome("r1", "")
    identify(out, {"x-netkv-predicted-ms": "123.4", "x-netkv-map": "map v7"}, b"", {}, 0.0)
    assert out.predicted_ttft_s == pytest.approx(0.1234) and out.map_source == "map v7"
    bad = Outcome("r2", "")
    identify(bad, {"x-netkv-predicted-ms": "fast"}, b"", {}, 0.0)
    assert bad.predicted_ttft_s is None


def test_map_reaction_reads_when_the_fault_shows_and_goes() -> None:
    from netkv.testbed.breakdown import map_reaction

    ok, slow = {"h1": 0.1, "h3": 0.1}, {"h1": 0.4, "h3": 0.1}
    series: list[list[Any]] = [[t, 1, slow if 2.3 <= t < 6.4 else ok]
                               for t in (1.0, 2.0, 2.25, 2.5, 4.0, 6.0, 6.25, 6.5)]
    seen, gone = map_reaction(series, 2.0, 6.0, "h1")
    assert seen == pytest.approx(0.5) and gone == pytest.approx(0.5)
    assert map_reaction([[3.0, 1, ok]], 2.0, 6.0, "h1") == (None, None)


def test_table_pairs_netkv_with_each_peer_run_by_run(tmp_path: Any) -> None:
    import json

    from netkv.testbed.breakdown import table

    dirs = []
    for i, (mine, peer) in enumerate(((1.0, 2.0), (1.5, 2.0), (2.0, 2.0))):
        d = tmp_path / f"run{i}"
        d.mkdir()
        routers = {name: {"ttft_mean_s": v, "faulty_link_transfers": i, "router_cpu_s": 1.0}
                   for name, v in (("netkv", mine), ("vllm-router:round_robin", peer))}
        (d / "routers.json").write_text(json.dumps({"routers": routers}))
        (d / "router-requests.jsonl").write_text("\n".join(
            json.dumps(row(name, ttft_s=v)) for name, v in (("netkv", mine),
                                                            ("vllm-router:round_robin", peer))))
        dirs.append(d)
    text = table(dirs)
    peer_line = next(x for x in text.splitlines() if "round_robin" in x)
    assert "| 0.75x +- " in peer_line  # mean of 0.5, 0.75, 1.0
    assert "| 3 / 3 |" in peer_line  # fault transfers summed over the runs
    assert "1500 +- " in next(x for x in text.splitlines() if "`netkv`" in x)
