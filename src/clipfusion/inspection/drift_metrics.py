"""The drift monitors' Prometheus metrics, read at each scrape (``serve``'s ``/metrics`` and ``watch
--metrics-port``): the alarm, the windows by outcome, and the last window's statistics, per model."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from clipfusion.inspection.drift import ALARM, DriftMonitor

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric


class DriftCollector:
    """A prometheus-client collector of the monitors ``monitors()`` gives (model name → its monitor)."""

    def __init__(self, monitors: Callable[[], Mapping[str, DriftMonitor]], prefix: str = "clipfusion_") -> None:
        self.monitors, self.prefix = monitors, prefix

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def gauge(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{self.prefix}drift_{name}", text, labels=["model"])

        alarm = gauge("alarm", "1 while the model's score-drift alarm is raised (bad windows in a row)")
        windows = CounterMetricFamily(f"{self.prefix}drift_windows", "finished drift windows of the version served, "
                                                                     "by outcome", labels=["model", "outcome"])
        ks = gauge("ks_statistic", "the last window's two-sample KS statistic: OK scores against the reference")
        median = gauge("median_shift_margins", "the last window's shift of the OK scores' median, in margins (the "
                                               "threshold minus the reference median)")
        p95 = gauge("p95_shift_margins", "the last window's shift of the OK scores' 95th percentile, in margins")
        ng = gauge("ng_rate_ratio", "the last window's share of NG verdicts")
        for name, monitor in self.monitors().items():
            state = monitor.state()
            alarm.add_metric([name], float(state.state == ALARM))
            windows.add_metric([name, "good"], monitor.windows - monitor.bad_windows)
            windows.add_metric([name, "bad"], monitor.bad_windows)
            last = state.last
            if last is not None:
                ng.add_metric([name], last.ng_rate)
                for family, value in ((ks, last.ks_statistic), (median, last.median_shift), (p95, last.p95_shift)):
                    if value is not None:
                        family.add_metric([name], value)
        yield from (alarm, windows, ks, median, p95, ng)
