"""The render node's Prometheus metrics, registered on a registry the caller owns (never the global one).

`render-node serve` builds the registry with `shared.service_health.new_registry("render-node")` and serves it on
`health.listen`; a node built without one keeps its metrics on a private registry.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RENDER_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class RenderMetrics:
    """Job counters, queue gauges, render-time histogram, retention and audit counters."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.submitted = Counter("megaportrait_render_jobs_submitted", "Jobs accepted (new, not idempotent resubmits).",
                                 ["backend"], registry=r)  # fmt: skip
        self.refused = Counter("megaportrait_render_submissions_refused", "Submissions refused, by reason code.", ["reason"], registry=r)
        self.completed = Counter("megaportrait_render_jobs_completed", "Jobs rendered successfully.", ["backend"], registry=r)
        self.failed = Counter("megaportrait_render_jobs_failed", "Jobs that ended failed, by reason code.", ["backend", "reason"],
                              registry=r)  # fmt: skip
        self.cancelled = Counter("megaportrait_render_jobs_cancelled", "Jobs cancelled while queued or rendering.", ["backend"],
                                 registry=r)  # fmt: skip
        self.render_seconds = Histogram(
            "megaportrait_render_seconds", "Wall time of successful renders (payload opened to result stored).", ["backend"],
            buckets=RENDER_SECONDS_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("megaportrait_render_queue_depth", "Jobs waiting for a worker.", registry=r)
        self.running = Gauge("megaportrait_render_jobs_running", "Jobs being rendered now.", registry=r)
        self.retention_deleted = Counter("megaportrait_retention_deleted", "Items deleted and verified gone by the retention sweeper.",
                                         ["kind"], registry=r)  # fmt: skip
        self.retention_failed = Counter("megaportrait_retention_failed", "Items the retention sweeper could not delete.", ["kind"],
                                        registry=r)  # fmt: skip
        self.audit_failures = Counter("megaportrait_audit_append_failures", "Audit entries that could not be written.", registry=r)

    def watch_queue(self, queued: Callable[[], int], running: Callable[[], int]) -> None:
        """Read the queue gauges from the job store at scrape time."""
        self.queue_depth.set_function(queued)
        self.running.set_function(running)
