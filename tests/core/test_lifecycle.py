"""Graceful stop (drain) and SIGHUP reload, in memory and on real twistd."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import sys
import termios
import time
from pathlib import Path

import pytest
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransport,
)
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import classImplementsOnly, implementer
from zope.interface.verify import verifyObject

import sockd.echo.tap as echo_tap
from sockd.core.config import Config, EchoSettings
from sockd.core.interfaces import IDrainable, IMetricsSource, IReconfigurable, Sample
from sockd.core.metrics import SockdCollector
from sockd.core.service import (
    DescriptorLimit,
    Lifecycle,
    Listener,
    make_daemon_service,
)
from sockd.daemons import DAEMONS
from sockd.echo.protocol import EchoFactory, RawEcho
from tests.files.test_sendfile import self_signed_pem
from tests.helpers import (
    ROOT,
    Daemon,
    connect,
    run_bounded,
    running,
    settings,
    tcp_exchange,
    tempdir,
    unblock_fifo,
)


class DrainTests(SynchronousTestCase):
    def test_drain_closes_after_answers(self) -> None:
        clock = MemoryReactorClock()
        factory = EchoFactory(EchoSettings(), clock)
        conns = [connect(factory) for _ in range(3)]
        conns[0][0].dataReceived(b"in flight\n")
        d = factory.drain(10)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(conns[0][1].value(), b"IN FLIGHT\n")
        self.assertFalse(any(t.connected for _, t in conns))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_drain_aborts_at_deadline(self) -> None:
        clock = MemoryReactorClock()
        factory = EchoFactory(EchoSettings(), clock, abort_grace=100)
        proto = factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()  # loseConnection never completes
        proto.makeConnection(transport)
        d = factory.drain(5)
        self.assertNoResult(d)
        clock.advance(5)
        self.assertTrue(transport.disconnected)  # aborted
        self.successResultOf(d)

    def test_drain_with_nothing_open(self) -> None:
        factory = EchoFactory(EchoSettings(), MemoryReactorClock())
        self.successResultOf(factory.drain(5))


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ini = tempdir(self) / "sockd.ini"
        self.ini.write_text(
            "[echo]\nlisten = tcp:7007:interface=127.0.0.1\nlisten_udp =\n"
            "max_line_length = 100\n"
        )
        options = echo_tap.Options()
        options.parseOptions(["--config", str(self.ini)])
        self.reactor = MemoryReactorClock()
        self.service = echo_tap.makeService(options, reactor=self.reactor)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        lifecycle = self.service.getServiceNamed("lifecycle")
        assert isinstance(lifecycle, Lifecycle)
        self.lifecycle = lifecycle
        self.factory = self.reactor.tcpServers[0][1]

    def test_new_settings_apply_to_new_connections(self) -> None:
        old, old_transport = connect(self.factory)
        self.ini.write_text(
            "[echo]\nlisten = tcp:7007:interface=127.0.0.1\nlisten_udp =\n"
            "max_line_length = 10\nmode = raw\nmax_connections_per_ip = 1\n"
        )
        self.assertTrue(self.lifecycle.reload())
        self.assertEqual(self.factory.max_line_length, 10)
        new, new_transport = connect(self.factory, "127.0.0.2")
        self.assertIsInstance(new, RawEcho)
        new.dataReceived(b"abc")
        self.assertEqual(new_transport.value(), b"ABC")
        # The existing connection keeps going, in line mode.
        old.dataReceived(b"still here\n")
        self.assertEqual(old_transport.value(), b"STILL HERE\n")
        # The new per-IP cap applies to the next connection.
        _, refused = connect(self.factory, "127.0.0.2")
        self.assertIn(b"too many connections", refused.value())

    def test_invalid_file_keeps_running_settings(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.ini.write_text("[echo]\nmax_line_length = tiny\n")
        self.assertFalse(self.lifecycle.reload())
        self.assertEqual(self.factory.max_line_length, 100)
        errors = [e for e in events if "reload refused" in e["log_format"]]
        self.assertEqual(len(errors), 1)
        self.assertIn("max_line_length = 'tiny'", errors[0]["error"])

    def test_fifo_in_place_of_the_file_is_refused_at_once(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.ini.unlink()
        os.mkfifo(self.ini)  # no writer: open() for reading would block
        reloaded = run_bounded(self.lifecycle.reload, release=unblock_fifo(self.ini))
        self.assertFalse(reloaded)
        self.assertEqual(self.factory.max_line_length, 100)
        (error,) = [e for e in events if "reload refused" in e["log_format"]]
        self.assertEqual(
            error["error"],
            f"{self.ini}: cannot read the configuration: it is a FIFO (named "
            "pipe), not a regular file",
        )

    def test_listen_change_is_warned_not_applied(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.ini.write_text("[echo]\nlisten = tcp:7008:interface=127.0.0.1\n")
        self.assertTrue(self.lifecycle.reload())
        self.assertEqual([p[0] for p in self.reactor.tcpServers], [7007])
        self.assertTrue(any(e.get("key") == "listen" for e in events))

    def test_client_certificate_change_is_warned(self) -> None:
        """The TLS context is made at start: client_certs waits for a restart."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        pem = self.ini.parent / "server.pem"
        pem.write_text(self_signed_pem())
        keys = {
            "listen": f"ssl:0:privateKey={pem}",
            "root": str(ROOT / "sockd" / "data" / "files"),
            "upload_clients": "alice",
            "client_ca": str(pem),
        }
        old = settings(file={**keys, "client_certs": "optional"})
        new = settings(file={**keys, "client_certs": "required"})
        top = MultiService()
        Listener("file", "x", lambda: None, Declared()).setServiceParent(top)  # type: ignore[arg-type,return-value]
        lifecycle = Lifecycle(old, ["file"], MemoryReactorClock(), lambda: new)
        lifecycle.setServiceParent(top)
        self.assertTrue(lifecycle.reload())
        self.assertEqual(
            [e["key"] for e in events if "next restart" in e["log_format"]],
            ["client_certs"],
        )


@implementer(IReconfigurable, IDrainable, IMetricsSource)
class Declared:
    """A listener's target that says what it offers."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def reconfigure(self, config: Config) -> None:
        self.calls.append(config)

    def drain(self, deadline: float) -> Deferred[None]:
        self.calls.append(deadline)
        return succeed(None)

    def metrics(self) -> list[Sample]:
        return [("connections_total", "counter", {"service": "x"}, 1.0)]


class Undeclared(Declared):
    """The same methods, but no declaration: the core leaves it alone."""


# Interfaces a subclass inherits; this one declares that it offers none.
classImplementsOnly(Undeclared)


class InterfaceTests(SynchronousTestCase):
    """The core finds what a service offers by its declarations only."""

    def tree(self) -> tuple[Lifecycle, Declared, Undeclared, Config]:
        new = settings("[sockd]\nshutdown_grace = 7\n")
        top = MultiService()
        declared, undeclared = Declared(), Undeclared()
        for n, target in enumerate((declared, undeclared)):
            listener = Listener("echo", f"tcp:{n}", lambda: None, target)  # type: ignore[arg-type,return-value]
            listener.setServiceParent(top)
        lifecycle = Lifecycle(settings(), ["echo"], MemoryReactorClock(), lambda: new)
        lifecycle.setServiceParent(top)
        return lifecycle, declared, undeclared, new

    def test_reload_and_stop_reach_declared_providers_only(self) -> None:
        lifecycle, declared, undeclared, new = self.tree()
        self.assertTrue(lifecycle.reload())
        # One signature: the whole configuration, each picks its section.
        self.assertEqual(declared.calls, [new])
        lifecycle.startService()
        self.successResultOf(lifecycle.stopService())  # type: ignore[arg-type]
        self.assertEqual(declared.calls, [new, 7.0])
        self.assertEqual(undeclared.calls, [])
        collector = SockdCollector(lambda: [declared, undeclared])
        self.assertEqual(collector.snapshot(), declared.metrics())

    def test_siblings_are_reconfigured_after_the_listeners(self) -> None:
        lifecycle, declared, _, new = self.tree()
        sibling = DescriptorLimit(settings(), ["echo"], lambda _: (1024, 1024))
        assert lifecycle.parent is not None
        sibling.setServiceParent(lifecycle.parent)
        self.assertTrue(lifecycle.reload())
        self.assertIs(sibling.config, new)
        self.assertEqual(declared.calls, [new])

    def test_every_service_declares_what_it_offers(self) -> None:
        conf = settings(
            "[sockd]\nworkers = 2\n[metrics]\nenabled = true\n"
            "[chat]\nenabled = true\nlisten = udp:0\n",
            echo={"listen": "tcp:0", "listen_udp": "udp:0"},
            file={"enabled": "true", "root": str(ROOT / "sockd" / "data" / "files")},
        )
        top = make_daemon_service(conf, DAEMONS, MemoryReactorClock())
        lifecycle = top.getServiceNamed("lifecycle")
        assert isinstance(lifecycle, Lifecycle)
        every = (IReconfigurable, IDrainable, IMetricsSource)
        expected = {
            "EchoFactory": every,
            "DatagramEcho": (IReconfigurable, IMetricsSource),
            "ChatProtocol": (IReconfigurable, IMetricsSource),
            "FileFactory": every,
            "CappedFactory": (IReconfigurable, IMetricsSource),
            "DescriptorLimit": (IReconfigurable,),
            "Workers": (IReconfigurable, IMetricsSource),
        }
        found = {type(t).__name__: t for _, t in lifecycle.targets()}
        found.update({type(s).__name__: s for s in top})
        for name, interfaces in expected.items():
            for interface in every:
                offered = interface in interfaces
                self.assertEqual(
                    interface.providedBy(found[name]), offered, (name, interface)
                )
                if offered:
                    # Each method, with the interface's signature.
                    verifyObject(interface, found[name])


class ReadyTests(SynchronousTestCase):
    def test_sighup_is_handled_before_ready_is_said(self) -> None:
        # systemctl reload may signal as soon as READY=1 arrives.
        ini = tempdir(self) / "sockd.ini"
        ini.write_text("[echo]\nlisten = tcp:7007:interface=127.0.0.1\nlisten_udp =\n")
        options = echo_tap.Options()
        options.parseOptions(["--config", str(ini)])
        reactor = MemoryReactorClock()
        service = echo_tap.makeService(options, reactor=reactor)
        handlers: list[object] = []

        def observe(event: dict[str, object]) -> None:
            if str(event.get("log_format", "")).startswith("sockd: ready"):
                handlers.append(signal.getsignal(signal.SIGHUP))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        reactor.run()
        lifecycle = service.getServiceNamed("lifecycle")
        assert isinstance(lifecycle, Lifecycle)
        self.assertEqual(handlers, [lifecycle._hangup])


BASE = "[echo]\nlisten = tcp:0:interface=127.0.0.1\nlisten_udp =\n"


@pytest.mark.integration
def test_sighup_reload_on_real_daemon(tmp_path: Path) -> None:
    with running("sockd-echo", BASE, directory=tmp_path) as daemon:
        assert daemon.process is not None
        port = daemon.port("echo")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as old:
            old.sendall(b"before\n")
            assert old.recv(100) == b"BEFORE\n"
            daemon.config_path.write_text(BASE + "mode = raw\n")
            daemon.process.send_signal(signal.SIGHUP)
            daemon.wait_for("configuration reloaded")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as new:
                new.sendall(b"no newline")
                assert new.recv(100) == b"NO NEWLINE"
            old.sendall(b"after\n")
            assert old.recv(100) == b"AFTER\n"
            # An invalid file is refused; the daemon keeps serving.
            daemon.config_path.write_text(BASE + "mode = sideways\n")
            daemon.process.send_signal(signal.SIGHUP)
            daemon.wait_for("reload refused")
            old.sendall(b"still\n")
            assert old.recv(100) == b"STILL\n"


@pytest.mark.integration
def test_sigterm_as_soon_as_ready_stops_gracefully(tmp_path: Path) -> None:
    # A stop racing a start (systemctl stop right after start): once ready
    # is said, SIGTERM is twistd's graceful stop, not the default death.
    daemon = Daemon("sockd-echo", BASE, directory=tmp_path)
    try:
        daemon.start()
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        # twistd reports the signal as its exit status either way; only a
        # handled one drains and says so.
        assert daemon.process.wait(10) in (0, -signal.SIGTERM)
        daemon.wait_for("sockd: stopping; letting work in flight finish")
        daemon.wait_for("Server Shut Down")
    finally:
        daemon.stop()


@pytest.mark.integration
def test_sighup_with_a_fifo_for_a_file_keeps_serving(tmp_path: Path) -> None:
    with running("sockd-echo", BASE, directory=tmp_path) as daemon:
        assert daemon.process is not None
        port = daemon.port("echo")
        daemon.config_path.unlink()
        os.mkfifo(daemon.config_path)
        try:
            daemon.process.send_signal(signal.SIGHUP)
            line = daemon.wait_for("reload refused")
            assert f"{daemon.config_path}: cannot read the configuration" in line
            assert "FIFO" in line
            assert tcp_exchange(port, b"alive\n") == b"ALIVE\n"
        finally:
            # Whatever happened, a daemon blocked in open() is released.
            unblock_fifo(daemon.config_path)()


@pytest.mark.integration
def test_sigterm_lets_answers_finish(tmp_path: Path) -> None:
    with running(
        "sockd-echo", BASE + "[sockd]\nshutdown_grace = 10\n", directory=tmp_path
    ) as daemon:
        assert daemon.process is not None
        port = daemon.port("echo")
        line = b"x" * 63 + b"\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            # Accepted and served (a connection still in the listen queue
            # is reset when the listener closes), then 500 KiB unread.
            s.sendall(line)
            assert s.recv(100) == line.upper()
            s.sendall(line * 8000)
            # Wait until answers are queued on our side, so the stop comes
            # while the server has work in flight.
            queued = 0
            deadline = time.monotonic() + 10
            while queued < 64 * 1024 and time.monotonic() < deadline:
                select.select([s], [], [], 0.05)
                raw = fcntl.ioctl(s, termios.FIONREAD, b"\0\0\0\0")
                queued = int.from_bytes(raw, sys.byteorder)
            assert queued >= 64 * 1024
            start = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            received = bytearray()
            while chunk := s.recv(1 << 20):
                received += chunk
        # twistd ends by re-raising the signal it was stopped with.
        assert daemon.process.wait(15) in (0, -signal.SIGTERM)
        daemon.wait_for("letting work in flight finish")
        assert time.monotonic() - start < 10
        # Whatever was read before the stop is answered whole, in order.
        assert len(received) > 0
        assert len(received) % len(line) == 0
        assert bytes(received) == line.upper() * (len(received) // len(line))
        assert len(received) >= queued
