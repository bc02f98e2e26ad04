"""An emulated engine's Prometheus metrics: vLLM's names, and NetKV's own for the KV side
channel."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from netkv.contracts.openai import BODY_ERROR_REASONS

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # vLLM's TTFT buckets


class Metrics:
    """vLLM's metric names (and NetKV's own for the KV side channel), one registry per
    engine so that many engines can share a process."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ("model_name", "engine")
        self.labels = {"model_name": model_name, "engine": "0"}
        self.running = Gauge("vllm:num_requests_running", "Requests in the model batch",
                             labels, registry=r).labels(**self.labels)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting (queue or KV)",
                             labels, registry=r).labels(**self.labels)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full",
                              labels, registry=r).labels(**self.labels)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token",
                              labels, buckets=TTFT_BUCKETS, registry=r).labels(**self.labels)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end latency",
                             labels, buckets=TTFT_BUCKETS, registry=r).labels(**self.labels)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds",
                                      "Time in the prefill phase", labels,
                                      buckets=TTFT_BUCKETS, registry=r).labels(**self.labels)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", labels,
                                     registry=r).labels(**self.labels)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated",
                                         labels, registry=r).labels(**self.labels)
        self.success = Counter("vllm:request_success", "Finished requests",
                               (*labels, "finished_reason"), registry=r)
        self.kv_pulled = Counter("netkv_engine_kv_pulled_bytes", "KV bytes read from "
                                 "prefills' side channels", registry=r)
        self.kv_served = Counter("netkv_engine_kv_served_bytes", "KV bytes sent from this "
                                 "engine's side channel", registry=r)
        self.kv_transfers = Counter("netkv_engine_kv_transfers", "Completed KV transfers",
                                    ("direction",), registry=r)
        self.kv_transfer_s = Histogram("netkv_engine_kv_transfer_seconds", "KV transfer "
                                       "time as the decode sees it", buckets=TTFT_BUCKETS,
                                       registry=r)
        self.kv_failures = Counter("netkv_engine_kv_pull_failures", "KV reads that failed "
                                   "(the decode then recomputes the prompt)", registry=r)
        self.leases = Gauge("netkv_engine_kv_leases", "KV leases held for remote decodes",
                            registry=r)
        self.lease_expired = Counter("netkv_engine_kv_lease_expired", "Leases that ran out "
                                     "before a decode read them", registry=r)
        self.rejected = Counter("netkv_engine_rejected_requests", "Bodies rejected at the "
                                "edge", ("reason",), registry=r)
        for reason in BODY_ERROR_REASONS:
            self.rejected.labels(reason)
