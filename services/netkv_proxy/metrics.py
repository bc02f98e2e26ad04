"""The proxy's Prometheus metrics (``netkv_proxy_*``), on one registry per proxy."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from netkv.contracts.openai import BODY_ERROR_REASONS

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
                   0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0)
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2)
OUTCOMES = ("ok", "bad_request", "prefill_failed", "decode_failed", "no_worker",
            "cancelled", "upstream_error")


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("netkv_proxy_requests", "Requests by endpoint and outcome",
                                ("endpoint", "outcome"), registry=r)
        self.ttft = Histogram("netkv_proxy_ttft_seconds", "Arrival at the proxy to the first "
                              "byte of the decode's answer sent to the client (end to end "
                              "as the proxy sees it; streaming requests)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram("netkv_proxy_prefill_seconds", "Prefill leg: request sent "
                                 "to the prefill's answer", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.handover = Histogram("netkv_proxy_handover_seconds", "Prefill answer to the "
                                  "first decode byte (KV transfer + first token)",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.predicted = Histogram("netkv_proxy_predicted_handover_seconds", "The decision's "
                                   "predicted transfer + first token", buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.prediction_error = Histogram("netkv_proxy_prediction_abs_error_seconds",
                                          "|observed - predicted| handover",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("netkv_proxy_decisions", "Decode decisions by policy, tier "
                                 "of the chosen path and map source (map or tier priors)",
                                 ("policy", "tier", "source"), registry=r)
        self.decision_time = Histogram("netkv_proxy_decision_seconds", "Time to decide",
                                       buckets=DECISION_BUCKETS, registry=r)
        self.retries = Counter("netkv_proxy_prefill_retries", "Prefill legs retried on "
                               "another prefill", ("reason",), registry=r)
        self.rejected = Counter("netkv_proxy_rejected_requests", "Bodies rejected at the "
                                "edge", ("reason",), registry=r)
        for reason in BODY_ERROR_REASONS:
            self.rejected.labels(reason)
        self.worker_healthy = Gauge("netkv_proxy_worker_healthy", "1 while a worker is "
                                    "admitted", ("worker", "role"), registry=r)
        self.worker_ejections = Gauge("netkv_proxy_worker_ejections", "Times a worker was "
                                      "ejected", ("worker", "role"), registry=r)
        self.worker_inflight = Gauge("netkv_proxy_worker_inflight", "Requests in flight",
                                     ("worker", "role"), registry=r)
        self.bookings = Gauge("netkv_proxy_bookings_open", "Transfers booked, not released",
                              registry=r)
        self.map_stale = Gauge("netkv_proxy_map_stale", "1 while decisions use the tier "
                               "priors (no map, or too old)", registry=r)
        self.map_age = Gauge("netkv_proxy_map_age_seconds", "Age of the congestion map",
                             registry=r)
