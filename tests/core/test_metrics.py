"""Prometheus metrics: the collector in memory, and a scrape of a real daemon."""

from __future__ import annotations

import socket
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client import generate_latest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import sockd.core.metrics as metrics
import sockd.echo.tap as echo_tap
from sockd.core.config import EchoSettings
from sockd.core.interfaces import IMetricsSource
from sockd.core.metrics import CappedFactory, SockdCollector, registry_for
from sockd.core.service import make_daemon_service
from sockd.echo.protocol import DatagramEcho, EchoFactory
from tests.helpers import (
    FakeDatagramTransport,
    connect,
    running,
    settings,
    tcp_exchange,
)


class CollectorTests(SynchronousTestCase):
    def test_exposition(self) -> None:
        clock = Clock()
        factory = EchoFactory(
            replace(EchoSettings(), max_connections_per_ip=1, idle_timeout=5), clock
        )
        connect(factory, "127.0.0.1")
        connect(factory, "127.0.0.1")  # refused: per-IP cap
        connect(factory, "127.0.0.2")
        clock.advance(5)  # both idle connections time out
        udp = DatagramEcho(replace(EchoSettings(), udp_max_datagram=4), clock)
        udp.makeConnection(FakeDatagramTransport())  # type: ignore[arg-type]
        udp.datagramReceived(b"ok", ("127.0.0.1", 5000))
        udp.datagramReceived(b"too long", ("127.0.0.1", 5000))
        text = generate_latest(
            registry_for(SockdCollector(lambda: [factory, udp, object()]))
        ).decode()
        for line in [
            'sockd_connections_accepted_total{service="echo"} 2.0',
            'sockd_connections_open{service="echo"} 0.0',
            'sockd_connections_refused_total{reason="per_ip",service="echo"} 1.0',
            'sockd_connections_refused_total{reason="total",service="echo"} 0.0',
            'sockd_connections_timed_out_total{service="echo",timer="idle"} 2.0',
            'sockd_connections_timed_out_total{service="echo",timer="request"} 0.0',
            'sockd_datagrams_answered_total{service="echo"} 1.0',
            'sockd_datagrams_dropped_total{reason="oversized",service="echo"} 1.0',
        ]:
            self.assertIn(line, text)

    def test_same_series_from_two_sources_is_summed(self) -> None:
        @implementer(IMetricsSource)
        class Source:
            def metrics(self) -> list[tuple[str, str, dict[str, str], float]]:
                return [("datagrams_answered_total", "counter", {"service": "x"}, 2)]

        text = generate_latest(
            registry_for(SockdCollector(lambda: [Source(), Source()]))
        ).decode()
        self.assertIn('sockd_datagrams_answered_total{service="x"} 4.0', text)
        self.assertEqual(text.count('sockd_datagrams_answered_total{service="x"}'), 1)


class CapTests(SynchronousTestCase):
    """The metrics page takes [metrics] max_connections connections at once."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        config = settings(
            "[echo]\nlisten_udp =\n[metrics]\nenabled = true\nmax_connections = 2\n"
        )
        self.top = make_daemon_service(config, {"echo": echo_tap.build}, self.reactor)
        self.top.privilegedStartService()
        (factory,) = [
            f for _, f, *_ in self.reactor.tcpServers if f.service_name == "metrics"
        ]
        assert isinstance(factory, CappedFactory)
        self.factory = factory

    def test_extra_connections_are_refused_at_once_and_counted(self) -> None:
        served = [connect(self.factory, f"127.0.0.{n}") for n in (1, 2)]
        for _, transport in served:
            self.assertTrue(transport.connected)
            self.assertEqual(transport.value(), b"")
        _, refused = connect(self.factory, "127.0.0.3")
        self.assertTrue(refused.value().startswith(b"HTTP/1.1 503 "))
        self.assertTrue(
            refused.value().endswith(
                b"\r\n\r\n" + b"too many connections to the metrics page"
            )
        )
        self.assertFalse(refused.connected)
        text = generate_latest(
            registry_for(SockdCollector(lambda: [self.factory]))
        ).decode()
        for line in [
            'sockd_connections_open{service="metrics"} 2.0',
            'sockd_connections_accepted_total{service="metrics"} 2.0',
            'sockd_connections_refused_total{reason="total",service="metrics"} 1.0',
        ]:
            self.assertIn(line, text)
        # A closed connection frees its slot.
        served[0][1].loseConnection()
        _, again = connect(self.factory, "127.0.0.3")
        self.assertTrue(again.connected)
        self.assertEqual(again.value(), b"")

    def test_idle_connections_are_closed(self) -> None:
        for n in (1, 2):
            connect(self.factory, f"127.0.0.{n}")
        self.reactor.advance(metrics.IDLE_TIMEOUT)
        self.assertEqual(len(self.factory.protocols), 0)
        _, transport = connect(self.factory)
        self.assertEqual(transport.value(), b"")

    def test_reload_changes_the_cap(self) -> None:
        lifecycle = self.top.getServiceNamed("lifecycle")
        lifecycle.loader = lambda: settings(
            "[echo]\nlisten_udp =\n[metrics]\nenabled = true\nmax_connections = 1\n"
        )
        self.assertTrue(lifecycle.reload())
        connect(self.factory, "127.0.0.1")
        _, refused = connect(self.factory, "127.0.0.2")
        self.assertIn(b"503", refused.value())


@pytest.mark.integration
def test_scrape_after_traffic() -> None:
    ini = """
    [echo]
    listen = tcp:0:interface=127.0.0.1
    listen_udp = udp:0:interface=127.0.0.1
    [metrics]
    enabled = true
    listen = tcp:0:interface=127.0.0.1
    """
    with running("sockd-echo", ini) as daemon:
        port = daemon.port("echo")
        for _ in range(3):
            assert tcp_exchange(port, b"hi\n") == b"HI\n"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(b"u", ("127.0.0.1", daemon.port("echo", "UDP")))
            assert s.recvfrom(10)[0] == b"U"
        url = f"http://127.0.0.1:{daemon.port('metrics')}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert 'sockd_connections_accepted_total{service="echo"} 3.0' in text
        assert 'sockd_datagrams_answered_total{service="echo"} 1.0' in text
        # The scrape counts itself.
        assert 'sockd_connections_open{service="metrics"} 1.0' in text
