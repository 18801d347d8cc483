"""``watch --metrics-port``: the watch's own Prometheus endpoint (prometheus-client), read at each scrape
from the running watch: images scored and failed, each outbox's backlog and deliveries, and the feed's
counters (frames read and dropped, reconnections, frozen alarms, files waiting to settle), and the score
drift of its verdicts (``clipfusion_watch_drift_*``)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from clipfusion.errors import ClipfusionError
from clipfusion.inspection.drift_metrics import DriftCollector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from clipfusion.tasks.watch import Watcher

PREFIX = "clipfusion_watch_"


class WatchCollector:
    """The metrics of ``watcher``, collected when scraped (nothing to keep in step while it runs)."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        watcher = self.watcher
        yield CounterMetricFamily(f"{PREFIX}images_scored", "Images scored since the watch started",
                                  value=watcher.scored)
        yield CounterMetricFamily(f"{PREFIX}images_failed", "Images that could not be scored (unreadable...)",
                                  value=watcher.failed)
        backlog = GaugeMetricFamily(f"{PREFIX}outbox_backlog_messages", "Verdicts not yet confirmed by the receiver",
                                    labels=["sink"])
        delivered = CounterMetricFamily(f"{PREFIX}outbox_delivered_messages", "Verdicts confirmed by the receiver",
                                        labels=["sink"])
        for outbox in watcher.outboxes:
            backlog.add_metric([outbox.sink.name], outbox.backlog)
            delivered.add_metric([outbox.sink.name], outbox.delivered)
        yield backlog
        yield delivered
        for name, value in watcher.feed.counters().items():
            family = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            yield family(f"{PREFIX}{name.removesuffix('_total')}", f"the feed's {name.replace('_', ' ')}", value=value)
        monitor = watcher.judge.drift
        if monitor is not None:
            yield from DriftCollector(lambda: {watcher.judge.category or "model": monitor}, PREFIX).collect()


def serve_metrics(watcher: Watcher, host: str, port: int) -> None:
    """Serve ``watcher``'s metrics on http://host:port/metrics from a thread of its own."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise ClipfusionError("--metrics-port needs prometheus-client: pip install 'clipfusion[serve]'") from None
    registry = CollectorRegistry()
    registry.register(WatchCollector(watcher))
    try:
        start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise ClipfusionError(f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror}); choose "
                              "another port") from None
