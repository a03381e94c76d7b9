"""Prometheus metrics: the collector in memory, and a scrape of a real daemon."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import generate_latest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sockd.core.config import EchoSettings, replace
from sockd.core.metrics import SockdCollector, registry_for
from sockd.echo.protocol import DatagramEcho, EchoFactory
from tests.helpers import FakeDatagramTransport, connect, running, tcp_exchange


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
            'sockd_connections_total{service="echo"} 2.0',
            'sockd_connections_open{service="echo"} 0.0',
            'sockd_refused_total{reason="per_ip",service="echo"} 1.0',
            'sockd_refused_total{reason="total",service="echo"} 0.0',
            'sockd_timeouts_total{service="echo",timer="idle"} 2.0',
            'sockd_datagrams_answered_total{service="echo"} 1.0',
            'sockd_datagrams_dropped_total{reason="oversized",service="echo"} 1.0',
        ]:
            self.assertIn(line, text)

    def test_same_series_from_two_sources_is_summed(self) -> None:
        class Source:
            def metrics(self) -> list[tuple[str, str, dict[str, str], float]]:
                return [("datagrams_answered_total", "counter", {"service": "x"}, 2)]

        text = generate_latest(
            registry_for(SockdCollector(lambda: [Source(), Source()]))
        ).decode()
        self.assertIn('sockd_datagrams_answered_total{service="x"} 4.0', text)
        self.assertEqual(text.count('sockd_datagrams_answered_total{service="x"}'), 1)


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
        assert 'sockd_connections_total{service="echo"} 3.0' in text
        assert 'sockd_datagrams_answered_total{service="echo"} 1.0' in text
