"""Prometheus metrics: the collector in memory, and a scrape of a real daemon."""

from __future__ import annotations

import re
import socket
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import sockd
import sockd.core.metrics as metrics
import sockd.echo.tap as echo_tap
from sockd.core.config import EchoSettings
from sockd.core.interfaces import REASONS, IMetricsSource
from sockd.core.metrics import (
    PREFIX,
    SERIES,
    CappedFactory,
    SockdCollector,
    registry_for,
)
from sockd.core.service import make_daemon_service
from sockd.daemons import DAEMONS
from sockd.echo.protocol import DatagramEcho, EchoFactory
from tests.chat.test_protocol import UDPMemoryReactor
from tests.helpers import (
    ROOT,
    FakeDatagramTransport,
    connect,
    running,
    settings,
    tcp_exchange,
)

#: (name, labels) -> value
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: series present only with a Redis federation, or with workers
OPTIONAL = {name for name in SERIES if name.startswith("chat_redis_")} | {
    "chat_remote_members",
    "workers",
    "worker_restarts_total",
}


def parse(text: str) -> tuple[Scrape, dict[str, str]]:
    """
    A page read with prometheus_client's own parser: every sample, and each
    family's type; a counter's samples must all end in C{_total}.
    """
    samples: Scrape = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name == family.name + "_total", sample
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    return samples, types


def check_names(samples: Scrape, types: dict[str, str]) -> None:
    """Every sockd series is in L{SERIES}, with its type and labels."""
    for name, pairs in samples:
        if not name.startswith(PREFIX):
            continue
        series = name[len(PREFIX) :]
        assert series in SERIES, f"{name} is not in SERIES"
        kind, labels, _ = SERIES[series]
        family = name.removesuffix("_total") if kind == "counter" else name
        assert types[family] == kind, (name, types[family])
        assert {k for k, _ in pairs} == set(labels), (name, pairs)
        for key, value in pairs:
            if key == "reason":
                assert value in REASONS, f"{name}: reason {value!r} not in REASONS"


def values(samples: Scrape, name: str, label: str, **where: str) -> dict[str, float]:
    """C{label} value -> sample value, for C{name}'s samples matching C{where}."""
    found = {}
    for (sample, pairs), value in samples.items():
        labels = dict(pairs)
        if sample == name and all(labels.get(k) == v for k, v in where.items()):
            found[labels[label]] = value
    return found


ECHO_DROPPED = {
    "loop",
    "loop_budget",
    "oversized",
    "rate_limited",
    "send_error",
    "acl",
}
#: TCP refusals, every service with a connection limiter
REFUSED = {"total", "per_ip", "share", "acl", "proxy"}
CHAT_DROPPED = {
    "rate_limited",
    "total",
    "share",
    "oversized",
    "invalid",
    "loop",
    "amplification",
    "send_error",
    "acl",
}
FILE_CODES = {"400", "403", "404", "405", "409", "413", "414", "416", "500", "503"}


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


class SeriesTests(SynchronousTestCase):
    """Every service's series, as documented, before any traffic."""

    def test_every_service_before_traffic(self) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        reactor = UDPMemoryReactor()
        config = settings(
            "[echo]\n[chat]\nenabled = true\n"
            f"[file]\nenabled = true\nroot = {root}\n"
            "[metrics]\nenabled = true\n"
        )
        top = make_daemon_service(config, DAEMONS, reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        lifecycle = top.getServiceNamed("lifecycle")
        collector = SockdCollector(lambda: [t for _, t in lifecycle.targets()])
        samples, types = parse(generate_latest(registry_for(collector)).decode())
        check_names(samples, types)
        names = {name[len(PREFIX) :] for name, _ in samples if name.startswith(PREFIX)}
        self.assertEqual(names, set(SERIES) - OPTIONAL)
        for service in ("echo", "file"):
            self.assertEqual(
                set(
                    values(
                        samples,
                        "sockd_connections_refused_total",
                        "reason",
                        service=service,
                    )
                ),
                REFUSED,
            )
        # The page has one cap, and no per-address one.
        self.assertEqual(
            values(
                samples,
                "sockd_connections_refused_total",
                "reason",
                service="metrics",
            ),
            {"total": 0},
        )
        self.assertEqual(
            set(
                values(
                    samples, "sockd_datagrams_dropped_total", "reason", service="echo"
                )
            ),
            ECHO_DROPPED,
        )
        self.assertEqual(
            set(
                values(
                    samples, "sockd_datagrams_dropped_total", "reason", service="chat"
                )
            ),
            CHAT_DROPPED,
        )
        self.assertEqual(
            set(values(samples, "sockd_file_request_errors_total", "code")),
            FILE_CODES,
        )
        self.assertEqual(
            set(
                values(
                    samples,
                    "sockd_connections_timed_out_total",
                    "timer",
                    service="file",
                )
            ),
            {"idle", "request", "handshake"},
        )
        # Nothing has happened yet: every sockd counter is at 0.
        for (name, _), value in samples.items():
            if name.startswith(PREFIX) and name.endswith("_total"):
                self.assertEqual(value, 0, name)

    def test_docs_table_is_the_series(self) -> None:
        """docs/deploy.md's table has every series, with its type and labels."""
        text = (ROOT / "docs" / "deploy.md").read_text()
        rows = re.findall(r"^\| `(sockd_\w+)` \| (\w+) \|([^|]*)\|", text, re.M)
        documented = {name[len(PREFIX) :]: (kind, cell) for name, kind, cell in rows}
        self.assertEqual(set(documented), set(SERIES))
        for name, (kind, cell) in documented.items():
            self.assertEqual(kind, SERIES[name][0], name)
            labels = set(re.findall(r"`(\w+)`", cell.replace("no `service`", "")))
            if "no `service`" not in cell:
                labels.add("service")
            self.assertEqual(labels, set(SERIES[name][1]), name)

    def test_reasons_table_is_the_vocabulary(self) -> None:
        text = (ROOT / "docs" / "deploy.md").read_text()
        rows = dict(re.findall(r"^\| `(\w+)` \| ([^|`]+?) \|$", text, re.M))
        self.assertEqual(rows, dict(REASONS))

    def test_build_info_once_with_workers(self) -> None:
        """Workers' snapshots are added up; build_info is not among them."""
        collector = SockdCollector(lambda: [])
        self.assertEqual(collector.snapshot(), [])
        samples, _ = parse(generate_latest(registry_for(collector)).decode())
        self.assertEqual(
            samples[
                (
                    "sockd_build_info",
                    (
                        ("twisted", metrics.twisted_version),
                        ("version", sockd.__version__),
                    ),
                )
            ],
            1,
        )


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


def scrape(port: int) -> tuple[Scrape, dict[str, str]]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse(response.read().decode())


@pytest.mark.integration
def test_real_daemon_series_before_and_after_traffic(tmp_path: Path) -> None:
    """
    C{twistd sockd} with echo, chat and file: every documented series is
    there at 0 before any traffic, and counts a refusal, a rate-limited
    datagram and an ERR 404 without any series appearing or going.
    """
    root = tmp_path / "root"
    root.mkdir()
    ini = f"""
    [echo]
    listen = tcp:0:interface=127.0.0.1
    listen_udp = udp:0:interface=127.0.0.1
    max_connections_per_ip = 1
    udp_rate = 0.01
    udp_burst = 1
    [chat]
    enabled = true
    listen = udp:0:interface=127.0.0.1
    [file]
    enabled = true
    listen = tcp:0:interface=127.0.0.1
    root = {root}
    [metrics]
    enabled = true
    listen = tcp:0:interface=127.0.0.1
    """
    with running("sockd", ini, directory=tmp_path) as daemon:
        page = daemon.port("metrics")
        before, types = scrape(page)
        check_names(before, types)
        names = {n[len(PREFIX) :] for n, _ in before if n.startswith(PREFIX)}
        assert names == set(SERIES) - OPTIONAL
        info = (("twisted", metrics.twisted_version), ("version", sockd.__version__))
        assert before[("sockd_build_info", info)] == 1
        for family, kind in [
            ("process_cpu_seconds", "counter"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_open_fds", "gauge"),
            ("python_info", "gauge"),
            ("python_gc_collections", "counter"),
        ]:
            assert types.get(family) == kind, family
        dropped = values(before, "sockd_datagrams_dropped_total", "reason")
        assert (
            set(
                values(
                    before, "sockd_datagrams_dropped_total", "reason", service="echo"
                )
            )
            == ECHO_DROPPED
        )
        assert (
            set(
                values(
                    before, "sockd_datagrams_dropped_total", "reason", service="chat"
                )
            )
            == CHAT_DROPPED
        )
        assert set(values(before, "sockd_file_request_errors_total", "code")) == (
            FILE_CODES
        )
        assert (
            set(
                values(
                    before, "sockd_connections_refused_total", "reason", service="echo"
                )
            )
            == REFUSED
        )
        for (name, pairs), value in before.items():
            counter = name.startswith(PREFIX) and name.endswith("_total")
            if counter and ("service", "metrics") not in pairs:
                assert value == 0, (name, pairs)
        assert set(dropped) <= set(REASONS)

        # A refused connection: the address already holds its one.
        echo = daemon.port("echo")
        with socket.create_connection(("127.0.0.1", echo), timeout=5) as held:
            held.sendall(b"a\n")
            assert held.recv(10) == b"A\n"
            assert tcp_exchange(echo, b"").startswith(b"ERR ")
        # A rate-limited datagram: the burst is one, refilled every 100 s.
        udp_port = daemon.port("echo", "UDP")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(b"one", ("127.0.0.1", udp_port))
            assert s.recvfrom(10)[0] == b"ONE"
            s.sendto(b"two", ("127.0.0.1", udp_port))
        # Another address's answer comes after "two" was handled.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.2", 0))
            s.settimeout(5)
            s.sendto(b"sync", ("127.0.0.1", udp_port))
            assert s.recvfrom(10)[0] == b"SYNC"
        # A file ERR 404.
        answer = tcp_exchange(daemon.port("file"), b"GET missing\r\n")
        assert answer.startswith(b"ERR 404 "), answer

        after, types = scrape(page)
        check_names(after, types)
        assert set(after) == set(before)
        assert values(
            after, "sockd_connections_refused_total", "reason", service="echo"
        ) == {"total": 0, "per_ip": 1, "share": 0, "acl": 0, "proxy": 0}
        echo_dropped = values(
            after, "sockd_datagrams_dropped_total", "reason", service="echo"
        )
        assert echo_dropped == {**dict.fromkeys(ECHO_DROPPED, 0), "rate_limited": 1}
        errors = values(after, "sockd_file_request_errors_total", "code")
        assert errors == {**dict.fromkeys(FILE_CODES, 0), "404": 1}
        assert values(after, "sockd_datagrams_answered_total", "service") == {"echo": 2}
