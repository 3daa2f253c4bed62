"""Every Prometheus metric of the service, in one place, on a registry of its own.

Each app gets its own ``CollectorRegistry`` (not the process-global default), so that several
apps in one process (tests) do not collide, and ``/metrics`` shows exactly this service.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

# Latency buckets from 0.1 ms to 2.5 s: batched inference on CPU sits in the ms range.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's collectors; attributes are the prometheus_client metric objects."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.http_requests = Counter(
            "csist_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_request_seconds = Histogram(
            "csist_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "csist_inference_seconds",
            "ONNX Runtime time per batched call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "csist_queue_wait_seconds",
            "time a group of windows waited for its batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "csist_batch_size",
            "windows per batched inference call",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_windows = Gauge("csist_queue_windows", "windows waiting for inference", registry=r)
        self.windows = Counter(
            "csist_windows",
            "windows run through the model, by source (rest, ws)",
            ["source"],
            registry=r,
        )
        self.frames = Counter("csist_frames", "frames received, by source (rest, ws)", ["source"], registry=r)
        self.targets = Counter("csist_targets", "targets emitted, by source (rest, ws)", ["source"], registry=r)
        self.active_tracks = Gauge("csist_active_tracks", "open WebSocket tracks", registry=r)
        self.ws_connections = Gauge("csist_ws_connections", "open WebSocket connections", registry=r)
        self.track_evictions = Counter(
            "csist_track_evictions",
            "tracks closed without an end message, by reason (idle, disconnect, shutdown)",
            ["reason"],
            registry=r,
        )
        self.errors = Counter("csist_errors", "errors returned to clients, by code", ["code"], registry=r)
        self.shed_windows = Counter(
            "csist_shed_windows",
            "windows not computed because they could not start inference before their deadline",
            registry=r,
        )
        self.degraded_windows = Counter(
            "csist_degraded_windows",
            "windows answered with the network's peaks (refined: false) because the fit would be late",
            registry=r,
        )
        self.cancelled_windows = Counter(
            "csist_cancelled_windows",
            "queued windows dropped because their client went away",
            registry=r,
        )
        self.ready = Gauge(
            "csist_ready",
            "1 when the model is loaded and warmed and the service not draining",
            registry=r,
        )
        self.model = Info("csist_model", "the served model", registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
