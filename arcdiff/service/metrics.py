"""Prometheus metrics of the HTTP API (names are a contract with deploy/) and their middleware.

Labels come from bounded sets only: the route template (never the raw path), the method, the
status code, served model names, solver names and rejection reasons.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

HTTP_REQUESTS = Counter("arcdiff_http_requests", "HTTP requests", ["route", "method", "status"])
HTTP_DURATION = Histogram(
    "arcdiff_http_request_duration_seconds",
    "HTTP request duration (wait=true requests included)",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)
GENERATIONS = Counter(
    "arcdiff_generation_requests",
    "Accepted generation requests, by what the response said: queued (202), finished or failed (waited)",
    ["model", "solver", "status"],
)
REJECTED = Counter("arcdiff_generations_rejected", "Generation requests refused", ["reason"])
QUEUE_DEPTH = Gauge(
    "arcdiff_queue_depth", "Generations accepted and not yet started", ["model"], multiprocess_mode="max"
)

_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


def render() -> tuple[bytes, str]:
    """The exposition of this process, or of all processes in PROMETHEUS_MULTIPROC_DIR mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request under its route template."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            HTTP_REQUESTS.labels(label, method if method in _METHODS else "other", str(status["code"])).inc()
            HTTP_DURATION.labels(label).observe(time.perf_counter() - start)


def init_route_series(app: Any) -> None:
    """Create every route's latency series at zero, so the first requests show up in rate() and
    histogram_quantile() instead of a series that first appears with its count already at N."""
    for route in app.routes:
        path = getattr(route, "path", None)
        if path and getattr(route, "include_in_schema", True):
            HTTP_DURATION.labels(path)


def init_generation_series(models: Any) -> None:
    """Create the served models' generation-request series at zero (see init_route_series)."""
    from arcdiff.model.solver_names import SOLVERS

    for model in models:
        for solver in SOLVERS:
            for status in ("queued", "finished", "failed"):
                GENERATIONS.labels(model, solver, status)
