"""Prometheus metrics (``/metrics``): instances, start durations and bytes, request latency.

Each app has its own registry (tests run several apps in one process). Request latency is
measured by a plain ASGI middleware (no per-request task or body buffering, unlike
``BaseHTTPMiddleware``), labelled by route template so ids do not explode the label space.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloudlet.catalog.models import InstanceRow, InstanceUserRow
from cloudlet.services.core import Cloudlet

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
START_BUCKETS = (0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class _InstanceCollector:
    """Instance counts by state and joined users, read from the catalog at scrape time."""

    def __init__(self, core: Cloudlet) -> None:
        self.core = core

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily("cloudlet_instances", "Instances by state", labels=["state"])
        u = GaugeMetricFamily("cloudlet_instance_users", "Users joined to instances")
        with self.core.catalog.session() as s:
            q = select(InstanceRow.state, func.count()).group_by(InstanceRow.state)
            counts = {state: n for state, n in s.execute(q)}
            users = s.scalar(select(func.count()).select_from(InstanceUserRow)) or 0
        for state in ("starting", "running", "stopping", "stopped", "failed"):
            g.add_metric([state], counts.get(state, 0))
        u.add_metric([], users)
        yield g
        yield u


class Metrics:
    def __init__(self, core: Cloudlet) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "cloudlet_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.starts = Histogram(
            "cloudlet_instance_start_seconds",
            "Instance start to first response, by kind (synthesis or cached snapshot)",
            ["kind"],
            buckets=START_BUCKETS,
            registry=self.registry,
        )
        self.apply = Histogram(
            "cloudlet_synthesis_apply_seconds",
            "Time to apply an overlay onto its base (synthesis starts only)",
            buckets=START_BUCKETS,
            registry=self.registry,
        )
        self.overlay_bytes = Counter(
            "cloudlet_synthesis_overlay_bytes",
            "Overlay bytes applied by synthesis",
            registry=self.registry,
        )
        self.registry.register(_InstanceCollector(core))  # type: ignore[arg-type]
        core.instances.on_started.append(self.started)

    def started(self, kind: str, timings: dict[str, float], overlay_bytes: int) -> None:
        self.starts.labels(kind).observe(timings.get("total_s", 0.0))
        if kind == "synthesis":
            self.apply.observe(timings.get("apply_s", 0.0))
            self.overlay_bytes.inc(overlay_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], path, str(status[0])).observe(
                time.perf_counter() - t0
            )
