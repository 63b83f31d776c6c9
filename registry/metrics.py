"""Prometheus metrics of one app instance.

Each app owns its ``CollectorRegistry`` (tests build many apps in one process; the global
default registry would reject the second one's metrics as duplicates). Requests are
labelled by the matched *route template* (``/v1/experts/{expert_id}``), never the raw path,
so an id in a URL cannot grow the number of time series without bound.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED_ROUTE = "<unmatched>"

# Seconds; the long tail covers multi-GiB uploads and downloads.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "agora_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "agora_http_request_duration_seconds",
            "Time from request start to the last byte of the response.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Counter(
            "agora_http_requests_started",
            "HTTP requests started (compare with agora_http_requests_total for in-flight).",
            ["method"],
            registry=self.registry,
        )
        self.uploads = Counter(
            "agora_uploads",
            "Artifact uploads, by kind (expert, base_model) and outcome (accepted, rejected).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.upload_bytes = Counter(
            "agora_upload_bytes",
            "Bytes received in artifact uploads, by kind and outcome.",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.download_bytes = Counter(
            "agora_download_bytes",
            "Bytes sent in blob downloads, by kind.",
            ["kind"],
            registry=self.registry,
        )

        self.jobs = Counter(
            "agora_job_events",
            "Job lifecycle events, by kind and event (leased, succeeded, retried, failed, "
            "dead, released).",
            ["kind", "event"],
            registry=self.registry,
        )

    def record_job(self, *, kind: str, event: str) -> None:
        self.jobs.labels(kind=kind, event=event).inc()

    def record_upload(self, *, kind: str, outcome: str, size: int) -> None:
        self.uploads.labels(kind=kind, outcome=outcome).inc()
        self.upload_bytes.labels(kind=kind, outcome=outcome).inc(size)

    def record_download(self, *, kind: str, size: int) -> None:
        self.download_bytes.labels(kind=kind).inc(size)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _route_label(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: that would buffer streamed bodies)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        status = 500
        start = time.perf_counter()
        self.metrics.in_flight.labels(method=method).inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The router writes the matched route into the shared scope dict on its way down.
            route = _route_label(scope)
            self.metrics.requests.labels(method=method, route=route, status=str(status)).inc()
            self.metrics.latency.labels(method=method, route=route).observe(
                time.perf_counter() - start
            )
