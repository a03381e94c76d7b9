"""
Prometheus metrics over HTTP (the C{[metrics]} section), off by default.

Nothing is counted for Prometheus on the hot path: at each scrape the
collector asks every service object that is an L{IMetricsSource} for its
counters (see L{sockd.core.interfaces.Sample}).  The official client serves the page
from a thread pool, so the snapshot is taken in the reactor thread.

The page takes at most C{[metrics] max_connections} connections at once
(L{CappedFactory}); a connection silent for L{IDLE_TIMEOUT} seconds is
closed, so idle clients cannot hold every slot for long.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from twisted.internet.interfaces import (
    IAddress,
    IProtocolFactory,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.resource import IResource
from zope.interface import implementer

from sockd import __version__
from sockd.core.config import Config
from sockd.core.interfaces import IMetricsSource, IReconfigurable, Sample
from sockd.core.limits import ConnectionLimiter, Refusal
from twisted import __version__ as twisted_version

__all__ = [
    "IDLE_TIMEOUT",
    "PREFIX",
    "SERIES",
    "CappedFactory",
    "SockdCollector",
    "build_info",
    "registry_for",
]

log = Logger(namespace="sockd")

PREFIX = "sockd_"
#: seconds an HTTP connection to the page may stay silent
IDLE_TIMEOUT = 60
#: what a client over C{[metrics] max_connections} gets before the close
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 40\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"too many connections to the metrics page"
)

#: every series sockd itself reports: name (after L{PREFIX}) -> (type,
#: labels, meaning).  docs/deploy.md has the same table; a test keeps them
#: in step.  C{reason} values are L{sockd.core.interfaces.REASONS}.
SERIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "build_info": ("gauge", ("version", "twisted"), "always 1; the versions running"),
    "connections_open": ("gauge", ("service",), "TCP connections open now"),
    "connections_accepted_total": (
        "counter",
        ("service",),
        "TCP connections accepted",
    ),
    "connections_refused_total": (
        "counter",
        ("service", "reason"),
        "TCP connections refused on arrival, by reason",
    ),
    "connections_evicted_total": (
        "counter",
        ("service",),
        "idle TCP connections closed to admit a less-served address",
    ),
    "connections_timed_out_total": (
        "counter",
        ("service", "timer"),
        "TCP connections closed by a timer, by timer",
    ),
    "datagrams_answered_total": (
        "counter",
        ("service",),
        "UDP echo datagrams answered",
    ),
    "datagrams_dropped_total": (
        "counter",
        ("service", "reason"),
        "datagrams dropped (received, or owed as an answer), by reason",
    ),
    "chat_members": ("gauge", ("service",), "chat members present now"),
    "chat_rooms": ("gauge", ("service",), "chat rooms open now"),
    "chat_relayed_total": (
        "counter",
        ("service",),
        "chat datagrams relayed to members",
    ),
    "chat_joined_total": ("counter", ("service",), "chat members joined"),
    "chat_timed_out_total": (
        "counter",
        ("service",),
        "chat members dropped for silence",
    ),
    "chat_joins_refused_total": (
        "counter",
        ("service", "reason"),
        "chat joins refused, by reason",
    ),
    "chat_stranger_received_bytes_total": (
        "counter",
        ("service",),
        "bytes received from addresses not yet members",
    ),
    "chat_stranger_sent_bytes_total": (
        "counter",
        ("service",),
        "bytes sent to addresses not yet members",
    ),
    "chat_redis_connected": (
        "gauge",
        ("service",),
        "1 while this chat node is connected to Redis",
    ),
    "chat_remote_members": (
        "gauge",
        ("service",),
        "chat members on other nodes, as last seen",
    ),
    "chat_redis_published_total": (
        "counter",
        ("service",),
        "chat events published to Redis",
    ),
    "chat_redis_received_total": (
        "counter",
        ("service",),
        "chat events received from Redis",
    ),
    "chat_redis_invalid_total": (
        "counter",
        ("service",),
        "chat events from Redis refused as malformed",
    ),
    "chat_redis_unsent_total": (
        "counter",
        ("service",),
        "chat events dropped while Redis lagged or was away",
    ),
    "chat_redis_outages_total": (
        "counter",
        ("service",),
        "times the connection to Redis was lost",
    ),
    "file_transfers_completed_total": (
        "counter",
        ("service",),
        "file transfers completed",
    ),
    "file_sent_bytes_total": ("counter", ("service",), "file body bytes sent"),
    "file_sendfile_bytes_total": (
        "counter",
        ("service",),
        "file body bytes of those sent with sendfile (zero-copy), counted as "
        "each transfer ends",
    ),
    "file_request_errors_total": (
        "counter",
        ("service", "code"),
        "file requests answered ERR, by code",
    ),
    "file_http_requests_total": (
        "counter",
        ("service", "method", "code"),
        "HTTP requests on the file port answered, by method and status",
    ),
    "file_upload_refusals_total": (
        "counter",
        ("service", "reason"),
        "uploads refused by upload_allow (acl) or upload_clients (certificate)",
    ),
    "workers": ("gauge", (), "worker processes running"),
    "worker_restarts_total": ("counter", (), "worker processes restarted"),
}


def build_info() -> Sample:
    """The C{build_info} sample: 1, labelled with the versions running."""
    labels = {"version": __version__, "twisted": twisted_version}
    return ("build_info", "gauge", labels, 1.0)


class SockdCollector:
    """A custom collector over the running services' own counters."""

    def __init__(
        self,
        sources: Callable[[], Iterable[object]],
        reactor: IReactorFromThreads | None = None,
    ) -> None:
        self.sources = sources
        self.reactor = reactor
        self._reactor_thread = threading.current_thread()

    def snapshot(self) -> list[Sample]:
        """The samples of every source that is an L{IMetricsSource}."""
        samples: list[Sample] = []
        for source in self.sources():
            counted = IMetricsSource(source, None)
            if counted is not None:
                samples.extend(counted.metrics())
        return samples

    def collect(self) -> Iterator[Metric]:
        if self.reactor is None or threading.current_thread() is self._reactor_thread:
            samples = self.snapshot()
        else:
            samples = blockingCallFromThread(self.reactor, self.snapshot)
        # Here, not in the snapshot: workers' snapshots are added up.
        samples.append(build_info())
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
                meaning = SERIES[series][2] if series in SERIES else series
                family = families[series] = cls(
                    full, meaning, labels=[k for k, _ in pairs]
                )
            family.add_metric([v for _, v in pairs], value)  # type: ignore[attr-defined]
        yield from families.values()


def registry_for(collector: SockdCollector) -> CollectorRegistry:
    """
    A registry with sockd's series and the client's standard C{process_*}
    (this process's) and C{python_*} (interpreter, garbage collector) ones.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def resource(collector: SockdCollector) -> IResource:
    """The HTTP resource serving C{/metrics} text (any path)."""
    from prometheus_client.twisted import MetricsResource

    return MetricsResource(registry_for(collector))


@implementer(IReconfigurable, IMetricsSource)
class CappedFactory(WrappingFactory):
    """
    The page's HTTP factory, under a cap on connections open at once:
    one more gets L{REFUSAL} and is closed, and is counted as refused.
    """

    noisy = False
    service_name = "metrics"
    #: the one key every connection counts under: no per-address cap
    _KEY = "all"

    def __init__(
        self,
        site: IProtocolFactory,
        max_connections: int,
        clock: IReactorTime,
        grace: float,
    ) -> None:
        super().__init__(site)
        self.clock = clock
        self.grace = grace
        self.limiter = ConnectionLimiter(max_connections, max_connections)
        self.accepted = 0

    # Any: a refused client gets a Refusal, not the ProtocolWrapper that
    # WrappingFactory's annotation promises.
    def buildProtocol(self, addr: IAddress | None) -> Any:
        reason = self.limiter.acquire(self._KEY)
        if reason is not None:
            log.warn(
                "metrics: refused {peer}: {reason}",
                peer=getattr(addr, "host", addr),
                reason=reason,
            )
            refusal: Protocol = Refusal(REFUSAL, self.clock, self.grace)
            return refusal
        self.accepted += 1
        return super().buildProtocol(addr)

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        self.limiter.release(self._KEY)

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: a new C{max_connections} applies to the next connection."""
        cap = config.metrics.max_connections
        self.limiter.max_total = self.limiter.max_per_peer = cap

    def metrics(self) -> list[Sample]:
        """The page's own connections, like any TCP service's."""
        service = {"service": self.service_name}
        return [
            ("connections_open", "gauge", service, len(self.protocols)),
            ("connections_accepted_total", "counter", service, self.accepted),
            (
                "connections_refused_total",
                "counter",
                {**service, "reason": "total"},
                self.limiter.refused,
            ),
        ]
