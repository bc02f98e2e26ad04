"""The proxy's health round reads only the gauge lines of a metrics page
(:func:`netkv_proxy.workers.gauge_lines`): the parsed load is the whole page's."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from netkv_proxy.workers import gauge_lines

from netkv.routing.scrape import parse_vllm_metrics

pytestmark = pytest.mark.unit

LINES = [
    'vllm:num_requests_running{model_name="m",engine="0"} 3.0',
    'vllm:num_requests_running{model_name="m",engine="1"} 2',
    "vllm:num_requests_waiting 1",
    'vllm:num_requests_waiting{model_name="m"}\t4e0',
    'vllm:kv_cache_usage_perc{model_name="m"} 0.25',
    "vllm:kv_cache_usage_perc 0.75",
    "vllm:num_requests_running_total 9",  # a longer name: neither parse counts it
    "vllm:num_requests_waiting nan",
    "vllm:num_requests_running -1",
    '# HELP vllm:num_requests_running Number of requests in model execution batches.',
    "# TYPE vllm:num_requests_running gauge",
    'vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="m"} 12.0',
    ' vllm:num_requests_running 5',  # not at the start of the line
    'other_metric{label="vllm:num_requests_running 7"} 1',
    "vllm:kv_cache_usage_perc\r",
    "",
]


def parsed(page: bytes) -> object:
    try:
        return parse_vllm_metrics(page)
    except ValueError as exc:
        return f"ValueError: {exc}"


@given(st.lists(st.sampled_from(LINES), max_size=40), st.sampled_from(["\n", "\r\n"]),
       st.booleans())
def test_the_gauge_lines_parse_as_the_whole_page(lines: list[str], sep: str,
                                                 trailing: bool) -> None:
    page = (sep.join(lines) + (sep if trailing else "")).encode()
    assert parsed(gauge_lines(page)) == parsed(page)


def test_a_large_page_shrinks_to_its_gauges() -> None:
    noise = "".join(f'vllm:time_to_first_token_seconds_bucket{{le="{i}"}} {i}\n'
                    for i in range(5000))
    page = (noise + "vllm:num_requests_running 3\n" + noise + "vllm:num_requests_waiting 2\n"
            + "vllm:kv_cache_usage_perc 0.5").encode()
    lines = gauge_lines(page)
    assert lines == (b"vllm:num_requests_running 3\nvllm:num_requests_waiting 2\n"
                     b"vllm:kv_cache_usage_perc 0.5")
    load = parse_vllm_metrics(lines)
    assert (load.running, load.waiting, load.kv_use) == (3.0, 2.0, 0.5)
