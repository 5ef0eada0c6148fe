"""Prometheus metrics of one app (its own registry, so apps in one process do not share counters)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The service's metrics: ``dpr_requests_total{route,status}``, ``dpr_request_seconds{route}``
    (latency in seconds), ``dpr_batch_size`` (queries encoded together), ``dpr_queue_depth``
    (queries waiting to be encoded) and ``dpr_index_passages`` (passages in the served index)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("dpr_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("dpr_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=LATENCY_BUCKETS_S)
        self.batch = Histogram("dpr_batch_size", "queries encoded together", registry=self.registry, buckets=BATCH_BUCKETS)
        self.queue = Gauge("dpr_queue_depth", "queries waiting to be encoded", registry=self.registry)
        self.index_size = Gauge("dpr_index_passages", "passages in the served index", registry=self.registry)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request: its route label (a known path or ``other``), status and latency in seconds."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (served by ``GET /metrics``)."""
        return generate_latest(self.registry)
