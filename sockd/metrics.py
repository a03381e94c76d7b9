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
    "evicted_total": "idle TCP connections closed to admit a less-served address",
    "timeouts_total": "connections closed by a timer, by timer",
    "datagrams_answered_total": "datagrams answered",
    "datagrams_dropped_total": "datagrams dropped, by reason",
    "chat_members": "chat members present now",
    "chat_rooms": "chat rooms open now",
    "chat_relayed_total": "chat datagrams relayed to members",
    "chat_joined_total": "chat members joined",
    "chat_timed_out_total": "chat members dropped for silence",
    "chat_redis_connected": "1 while this chat node is connected to Redis",
    "chat_remote_members": "chat members on other nodes, as last seen",
    "chat_redis_published_total": "chat events published to Redis",
    "chat_redis_received_total": "chat events received from Redis",
    "chat_redis_invalid_total": "chat events from Redis refused as malformed",
    "chat_redis_unsent_total": "chat events dropped while Redis lagged or was away",
    "chat_redis_outages_total": "times the connection to Redis was lost",
    "files_served_total": "file transfers completed",
    "file_bytes_sent_total": "file body bytes sent",
    "file_requests_refused_total": "file requests refused with an error",
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
        # Several sources (one protocol per UDP port, say) may report the
        # same series: a series appears once, with the sum.
        totals: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for name, kind, labels, value in samples:
            key = (name, kind, tuple(sorted(labels.items())))
            totals[key] = totals.get(key, 0.0) + value
        families: dict[str, Metric] = {}
        for (series, kind, pairs), value in totals.items():
            family = families.get(series)
            if family is None:
                full = PREFIX + (
                    series[: -len("_total")] if kind == "counter" else series
                )
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[series] = cls(
                    full, HELP.get(series, series), labels=[k for k, _ in pairs]
                )
            family.add_metric([v for _, v in pairs], value)  # type: ignore[attr-defined]
        yield from families.values()


def registry_for(collector: SockdCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return registry


def resource(collector: SockdCollector) -> Any:
    """The HTTP resource serving C{/metrics} text (any path)."""
    from prometheus_client.twisted import MetricsResource

    return MetricsResource(registry_for(collector))
