"""The oracle's Prometheus metrics, on a registry of its own (two oracles in one process, as
in the tests, must not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OracleMetrics:
    """Names follow the Prometheus conventions with the ``netkv_`` prefix."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.samples_ingested = Counter(
            "netkv_samples_ingested_total", "Samples applied to the congestion map, by kind",
            ["kind"], registry=r)
        self.samples_rejected = Counter(
            "netkv_samples_rejected_total",
            "Stream entries rejected (a batch is rejected whole), by reason", ["reason"],
            registry=r)
        self.batches = Counter("netkv_batches_ingested_total", "Batches applied", registry=r)
        self.redis_errors = Counter(
            "netkv_oracle_redis_errors_total", "Failed Redis operations, by operation",
            ["op"], registry=r)
        self.mqtt_published = Counter(
            "netkv_map_announcements_total", "Map versions announced on MQTT", registry=r)
        self.trimmed = Counter(
            "netkv_entries_deleted_total", "Rejected stream entries deleted from Redis",
            registry=r)
        self.claimed = Counter(
            "netkv_entries_claimed_total", "Pending entries taken over from idle consumers",
            registry=r)
        self.map_version = Gauge("netkv_map_version", "Version of the map served", registry=r)
        self.map_created = Gauge("netkv_map_created_timestamp_seconds",
                                 "Creation time of the map served", registry=r)
        self.map_age = Gauge("netkv_map_age_seconds", "Age of the map served", registry=r)
        self.leader = Gauge("netkv_oracle_leader", "1 while this oracle holds the lock",
                            registry=r)
        self.streams = Gauge("netkv_oracle_streams", "Agent sample streams being read",
                             registry=r)
        self.links_fresh = Gauge("netkv_map_links_fresh", "Links with confidence > 0",
                                 registry=r)
        self.publish_seconds = Histogram(
            "netkv_map_publish_duration_seconds", "Time to snapshot and store one version",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5), registry=r)
