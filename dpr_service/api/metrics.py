"""Prometheus metrics of one app (its own registry, so apps in one process do not share counters)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# The stages of one POST /search, in order (docs/serving.md#where-the-time-of-a-search-goes):
STAGES = ("queue_wait", "encode", "search", "lookup")


class Metrics:
    """The service's metrics: ``dpr_requests_total{route,status}``, ``dpr_request_seconds{route}``
    (latency in seconds), ``dpr_batch_size`` (queries encoded together), ``dpr_queue_depth``
    (queries waiting to be encoded), ``dpr_index_passages`` (passages in the served index),
    ``dpr_search_stage_seconds{stage}`` (seconds a ``POST /search`` spent in each of :data:`STAGES`),
    and ``dpr_lane_pending{lane}`` / ``dpr_lane_tokens{lane}`` (calls and tokens queued or running in
    each lane, read when ``/metrics`` is scraped)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("dpr_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("dpr_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=LATENCY_BUCKETS_S)
        self.batch = Histogram("dpr_batch_size", "queries encoded together", registry=self.registry, buckets=BATCH_BUCKETS)
        self.queue = Gauge("dpr_queue_depth", "queries waiting to be encoded", registry=self.registry)
        self.index_size = Gauge("dpr_index_passages", "passages in the served index", registry=self.registry)
        self.stages = Histogram("dpr_search_stage_seconds", "seconds a /search spent in each stage: queue_wait (for its "
                                "queries' encoding to start), encode, search (FAISS, BM25 or fused ranking), lookup "
                                "(passage store)", ["stage"], registry=self.registry, buckets=STAGE_BUCKETS_S)
        self.lane_pending = Gauge("dpr_lane_pending", "calls queued or running in each lane (api/lanes.py)", ["lane"],
                                  registry=self.registry)
        self.lane_tokens = Gauge("dpr_lane_tokens", "tokens of the calls queued or running in each lane", ["lane"],
                                 registry=self.registry)

    def observe_lanes(self, lanes) -> None:
        """Set ``dpr_lane_pending{lane}`` (calls queued or running) and ``dpr_lane_tokens{lane}``
        (their tokens) from the app's :class:`~dpr_service.api.lanes.Lanes` (None: nothing to set)."""
        for name, lane in (lanes.by_name.items() if lanes is not None else ()):
            self.lane_pending.labels(name).set(lane.pending)
            self.lane_tokens.labels(name).set(lane.cost)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request: its route label (a known path or ``other``), status and latency in seconds."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_stages(self, seconds: dict[str, float]) -> None:
        """Record one answered ``/search``: seconds per stage name of :data:`STAGES` (a stage it did
        not go through, such as encoding in BM25 mode, is absent). Raises KeyError for another name."""
        for stage, s in seconds.items():
            if stage not in STAGES:
                raise KeyError(f"unknown stage {stage!r}; the stages are {STAGES}")
            self.stages.labels(stage).observe(s)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (served by ``GET /metrics``)."""
        return generate_latest(self.registry)
