"""
Tests of sockd.core._twisted: the check of Twisted's internals, and the
stock paths taken when Twisted changed.
"""

from __future__ import annotations

import os
import select
import socket
from typing import Any

import pytest
from twisted.internet import abstract, endpoints, posixbase, udp
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase

from sockd.core import _twisted
from sockd.core._twisted import (
    epoll_parts,
    fast_paths,
    queued_bytes,
    self_check,
    systemd_record,
    udp_connected,
    write_idle,
)
from sockd.core.eager import send_datagram
from sockd.core.epoll import lean_dispatch

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class CheckTests(SynchronousTestCase):
    """With the Twisted installed, every fast path is on, quietly."""

    def setUp(self) -> None:
        self.patch(_twisted, "checked", None)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_all_fast_paths_on(self) -> None:
        paths = self_check()
        self.assertEqual(
            paths,
            _twisted.FastPaths(
                tcp_write=True, udp_send=True, epoll_dispatch=True, systemd_record=True
            ),
        )
        self.assertEqual(len(self.events), 0)

    def test_checked_once(self) -> None:
        first = fast_paths()
        self.assertIs(fast_paths(), first)

    def test_leaves_no_descriptor_open(self) -> None:
        before = descriptors()
        self_check()
        self.assertEqual(descriptors(), before)


class AccessorTests(SynchronousTestCase):
    def test_tcp_write_buffer(self) -> None:
        from twisted.internet import tcp

        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        transport: Any = tcp.Connection(ours, Protocol(), MemoryReactor())
        transport.connected = True
        self.assertEqual((queued_bytes(transport), write_idle(transport)), (0, True))
        transport.write(b"abc")
        transport.writeSequence([b"de", b"f"])
        self.assertEqual((queued_bytes(transport), write_idle(transport)), (6, False))
        transport.doWrite()
        self.assertEqual(theirs.recv(10), b"abcdef")
        self.assertEqual((queued_bytes(transport), write_idle(transport)), (0, True))
        transport.loseWriteConnection()
        self.assertFalse(write_idle(transport))

    def test_udp_connected(self) -> None:
        reactor: Any = MemoryReactor()
        port: Any = udp.Port(0, DatagramProtocol(), "127.0.0.1", reactor=reactor)
        port.startListening()
        self.addCleanup(port.socket.close)
        self.assertFalse(udp_connected(port))
        port.connect("127.0.0.1", port.getHost().port)
        self.assertTrue(udp_connected(port))

    def test_epoll_parts(self) -> None:
        reactor = epollreactor.EPollReactor()
        parts = epoll_parts(reactor)
        self.addCleanup(parts.poller.close)
        self.assertEqual(parts.selectables, {reactor.waker.fileno(): reactor.waker})
        self.assertTrue(callable(parts.dispatch))
        self.assertTrue(callable(parts.disconnect))
        self.assertEqual(parts.readable, select.EPOLLIN)

    def test_systemd_record_is_twisteds(self) -> None:
        record = ListenFDs([5, 6], ("web", "admin"))
        self.patch(endpoints._SystemdParser, "_sddaemon", record)
        self.assertIs(systemd_record(), record)


class Quacks:
    """A record of another type that Twisted's parser still reads."""

    def inheritedDescriptors(self) -> list[int]:
        return [7, 8]

    def inheritedNamedDescriptors(self) -> dict[str, int]:
        return {"web": 7, "admin": 8}


class ChangedTwistedTests(SynchronousTestCase):
    """
    Each group of internals, changed as a new Twisted might change it: its
    fast path goes off, the stock path serves, and one line says so.
    """

    def setUp(self) -> None:
        self.patch(_twisted, "checked", None)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def warning(self) -> str:
        (event,) = self.events
        self.assertEqual(event["log_level"], LogLevel.warn)
        return formatEvent(event)

    def test_tcp_attribute_gone(self) -> None:
        # As if Twisted renamed _writeDisconnecting (a class default).
        self.patch(abstract.FileDescriptor, "_writeDisconnecting", property())
        paths = fast_paths()
        self.assertFalse(paths.tcp_write)
        self.assertTrue(paths.udp_send and paths.epoll_dispatch)
        text = self.warning()
        self.assertIn("TCP write buffer: AttributeError", text)
        self.assertIn("instead of: eager TCP writes and sendfile", text)

    def test_tcp_write_accounting_changed(self) -> None:
        original = abstract.FileDescriptor.write

        def write(self: Any, data: bytes) -> None:
            original(self, data)
            self._tempDataLen = 0  # counted elsewhere now

        self.patch(abstract.FileDescriptor, "write", write)
        self.assertFalse(fast_paths().tcp_write)
        self.assertIn("a queued write counts 0 bytes, not 5", self.warning())

    def test_udp_attribute_renamed(self) -> None:
        original = udp.Port.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            self._peer = self.__dict__.pop("_connectedAddr")

        self.patch(udp.Port, "__init__", init)
        self.assertFalse(fast_paths().udp_send)
        self.assertIn("UDP connected address: AttributeError", self.warning())
        # send_datagram leaves it to the port's own write.
        written: list[tuple[bytes, Any]] = []
        port: Any = udp.Port(0, DatagramProtocol(), reactor=MemoryReactor())
        port.write = lambda data, addr=None: written.append((data, addr))
        send_datagram(port, b"x", ("127.0.0.1", 5))
        self.assertEqual(written, [(b"x", ("127.0.0.1", 5))])

    def test_epoll_dispatch_gone(self) -> None:
        self.patch(posixbase._PollLikeMixin, "_doReadOrWrite", property())
        reactor = epollreactor.EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.assertFalse(lean_dispatch(reactor))
        self.assertNotIn("doIteration", vars(reactor))  # Twisted's own
        self.assertIn("instead of: lean epoll dispatch", self.warning())

    def test_epoll_writers_kept_elsewhere(self) -> None:
        # A Twisted that records write interest somewhere sockd does not
        # look: no held writer removals, and no lean dispatch either.
        original = epollreactor.EPollReactor.addWriter

        def add_writer(reactor: Any, writer: Any) -> None:
            original(reactor, writer)
            reactor._writes.discard(writer.fileno())

        self.patch(epollreactor.EPollReactor, "addWriter", add_writer)
        reactor = epollreactor.EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.assertFalse(lean_dispatch(reactor))
        for name in ("doIteration", "addWriter", "removeWriter", "removeReader"):
            self.assertNotIn(name, vars(reactor))  # Twisted's own
        self.assertIn("a writer is not among the writers", self.warning())

    def test_epoll_dispatch_behaves_differently(self) -> None:
        self.patch(posixbase._PollLikeMixin, "_doReadOrWrite", lambda *args: None)
        self.assertFalse(fast_paths().epoll_dispatch)
        self.assertIn("was read 0 times, not once", self.warning())

    def test_epoll_disconnect_behaves_differently(self) -> None:
        self.patch(
            posixbase._DisconnectSelectableMixin,
            "_disconnectSelectable",
            lambda *args: None,
        )
        self.assertFalse(fast_paths().epoll_dispatch)
        self.assertIn("was not told its connection is lost", self.warning())

    def test_systemd_record_of_another_type(self) -> None:
        self.patch(endpoints._SystemdParser, "_sddaemon", Quacks())
        self.patch(os, "environ", {**os.environ, "LISTEN_FDNAMES": "web:admin"})
        self.assertFalse(fast_paths().systemd_record)
        self.assertIn("the record is a Quacks, not a ListenFDs", self.warning())
        # Rebuilt through Twisted's public systemd: parser.
        record = systemd_record()
        self.assertEqual(record.inheritedDescriptors(), [7, 8])
        self.assertEqual(record.inheritedNamedDescriptors(), {"web": 7, "admin": 8})

    def test_systemd_record_gone(self) -> None:
        self.patch(endpoints._SystemdParser, "_sddaemon", property())
        self.assertFalse(fast_paths().systemd_record)
        self.assertIn("systemd record:", self.warning())
        # Twisted's parser cannot read it either: nothing inherited.
        self.assertEqual(systemd_record().inheritedDescriptors(), [])

    def test_said_once_whoever_asks(self) -> None:
        self.patch(abstract.FileDescriptor, "_writeDisconnecting", property())
        self.patch(posixbase._PollLikeMixin, "_doReadOrWrite", property())
        reactor = epollreactor.EPollReactor()
        self.addCleanup(reactor._poller.close)
        for _ in range(3):
            lean_dispatch(reactor)
            fast_paths()
        text = self.warning()  # exactly one event
        self.assertIn("eager TCP writes and sendfile, lean epoll dispatch", text)
        self.assertIn(f"checked on ({_twisted.CHECKED_ON})", text)
