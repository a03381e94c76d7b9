"""
Prometheus metrics over HTTP (the C{[metrics]} section), off by default.

Nothing is counted for Prometheus on the hot path: at each scrape the
collector asks every service object with a C{metrics()} method for its
counters (see L{sockd.limits.Sample}).  The official client serves the page
from a thread pool, so the snapshot is taken in the reactor thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from twisted.internet.threads import blockingCallFromThread

from sockd.limits import Sample

__all__ = ["PREFIX", "SockdCollector", "registry_for"]

PREFIX = "sockd_"

HELP = {
    "connections_open": "TCP connections open now",
    "connections_total": "TCP connections accepted",
    "refused_total": "TCP connections refused, by reason",
    "timeouts_total": "connections closed by a timer, by timer",
    "datagrams_answered_total": "datagrams answered",
    "datagrams_dropped_total": "datagrams dropped, by reason",
}


class SockdCollector:
    """A custom collector over the running services' own counters."""

    def __init__(
        self, sources: Callable[[], Iterable[Any]], reactor: Any = None
    ) -> None:
        self.sources = sources
        self.reactor = reactor
        self._reactor_thread = threading.current_thread()

    def snapshot(self) -> list[Sample]:
        samples: list[Sample] = []
        for source in self.sources():
            metrics = getattr(source, "metrics", None)
            if metrics is not None:
                samples.extend(metrics())
        return samples

    def collect(self) -> Iterator[Metric]:
        if self.reactor is None or threading.current_thread() is self._reactor_thread:
            samples = self.snapshot()
        else:
            samples = blockingCallFromThread(self.reactor, self.snapshot)
        families: dict[str, Metric] = {}
        for name, kind, labels, value in samples:
            family = families.get(name)
            if family is None:
                full = PREFIX + (name[: -len("_total")] if kind == "counter" else name)
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[name] = cls(
                    full, HELP.get(name, name), labels=sorted(labels)
                )
            family.add_metric([labels[k] for k in sorted(labels)], value)  # type: ignore[attr-defined]
        yield from families.values()


def registry_for(collector: SockdCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return registry


def resource(collector: SockdCollector) -> Any:
    """The HTTP resource serving C{/metrics} text (any path)."""
    from prometheus_client.twisted import MetricsResource

    return MetricsResource(registry_for(collector))
