"""Prometheus metrics of one service instance (its own registry, so several apps in one process,
as in tests, never collide)."""
from __future__ import annotations

import functools
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from clipfusion.publishing.outbox import Outbox


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("clipfusion_requests_total", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("clipfusion_request_seconds", "HTTP request latency", ["route"],
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.queue_depth = Gauge("clipfusion_queue_depth", "images waiting for their model", ["model"],
                                 registry=self.registry)
        self.batch_size = Histogram("clipfusion_batch_size", "images per model batch", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.batch_seconds = Histogram("clipfusion_batch_seconds", "time per batch in a model replica's thread",
                                       ["model"], registry=self.registry)
        self.replica_batches = Counter("clipfusion_replica_batches_total", "batches run, by model replica",
                                       ["model", "replica"], registry=self.registry)
        self.model_seconds = Histogram("clipfusion_model_seconds", "time in the detector per batch (scoring only)",
                                       ["model"], registry=self.registry)
        self.disk_free = Gauge("clipfusion_disk_free_bytes", "free space on the disk of the data folder",
                               registry=self.registry)
        self.decisions = Counter("clipfusion_decisions_total", "inspections by decision", ["model", "decision"],
                                 registry=self.registry)
        self.outbox_backlog = Gauge("clipfusion_outbox_backlog_messages", "verdicts not yet confirmed by a --publish "
                                    "receiver", ["sink"], registry=self.registry)
        self.outbox_delivered = Gauge("clipfusion_outbox_delivered_messages", "verdicts confirmed by a --publish "
                                      "receiver (over the outbox's life)", ["sink"], registry=self.registry)

    def watch_outboxes(self, outboxes: Sequence[Outbox]) -> None:
        """Each outbox's backlog and deliveries, read at each scrape."""
        for outbox in outboxes:
            self.outbox_backlog.labels(outbox.sink.name).set_function(functools.partial(_backlog, outbox))
            self.outbox_delivered.labels(outbox.sink.name).set_function(functools.partial(_delivered, outbox))


def _backlog(outbox: Outbox) -> float:
    return float(outbox.backlog)


def _delivered(outbox: Outbox) -> float:
    return float(outbox.delivered)
