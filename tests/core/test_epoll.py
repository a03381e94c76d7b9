"""Tests of sockd.core.epoll: direct event dispatch on a private epoll reactor."""

from __future__ import annotations

import os
import select
import socket
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sockd.core._twisted import epoll_parts
from sockd.core.epoll import lean_dispatch
from sockd.files.sendfile import ChunkProducer, SendfileProducer

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class Reader:
    """A readable socket the reactor watches; records each doRead."""

    def __init__(self, sock: socket.socket, seen: list[str], name: str) -> None:
        self.sock = sock
        self.seen = seen
        self.name = name
        self.then: Any = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return self.name

    def doRead(self) -> Any:
        self.sock.recv(100)
        self.seen.append(self.name)
        # What then() returns is what the reactor is told (a reason to close).
        return self.then() if self.then is not None else None

    def connectionLost(self, reason: object) -> None:
        self.seen.append(f"{self.name} lost")


class LeanDispatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = epollreactor.EPollReactor()
        self.addCleanup(epoll_parts(self.reactor).poller.close)
        self.seen: list[str] = []

    def reader(self, name: str) -> Reader:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        reader = Reader(ours, self.seen, name)
        self.reactor.addReader(reader)
        # Cleanups run last first: unwatched before its socket closes.
        self.addCleanup(self.reactor.removeReader, reader)
        theirs.send(b"x")
        return reader

    def test_only_twisted_own_epoll_reactor_once(self) -> None:
        self.assertFalse(lean_dispatch(MemoryReactorClock()))
        self.assertTrue(lean_dispatch(self.reactor))
        self.assertFalse(lean_dispatch(self.reactor))

    def test_ready_descriptors_reach_their_handlers(self) -> None:
        lean_dispatch(self.reactor)
        self.reader("a")
        self.reader("b")
        self.reactor.doIteration(1)
        self.assertEqual(sorted(self.seen), ["a", "b"])
        # Nothing ready: returns after the timeout, handling nothing.
        self.seen.clear()
        self.reactor.doIteration(0)
        self.assertEqual(self.seen, [])

    def test_a_failing_handler_does_not_stop_the_others(self) -> None:
        original = self.reactor._disconnectSelectable

        def disconnect(selectable: Any, why: object, isRead: bool) -> None:
            if selectable.name == "bad":
                raise RuntimeError("boom")
            original(selectable, why, isRead)

        self.reactor._disconnectSelectable = disconnect
        lean_dispatch(self.reactor)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.reader("bad").then = ConnectionDone
        self.reader("good").then = ConnectionDone
        self.reactor.doIteration(1)
        self.assertEqual(sorted(self.seen), ["bad", "good", "good lost"])
        (failed,) = [e for e in events if "log_failure" in e]
        self.assertIn("handling an event on", formatEvent(failed))
        self.assertEqual(failed["log_failure"].getErrorMessage(), "boom")
        self.flushLoggedErrors(RuntimeError)

    def test_other_events_go_through_the_reactor(self) -> None:
        # Plain reads are handled directly; a hang-up, an error or a write
        # by the reactor's own _doReadOrWrite.
        handled: list[int] = []
        original = self.reactor._doReadOrWrite

        def handle(selectable: Any, fd: int, event: int) -> None:
            handled.append(event)
            original(selectable, fd, event)

        self.reactor._doReadOrWrite = handle
        lean_dispatch(self.reactor)
        self.reader("plain")
        self.reactor.doIteration(1)
        self.assertEqual((self.seen, handled), (["plain"], []))
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        hung = Reader(ours, self.seen, "hung")
        self.reactor.addReader(hung)
        self.addCleanup(self.reactor.removeReader, hung)
        theirs.close()
        self.reactor.doIteration(1)
        (event,) = handled
        self.assertTrue(event & select.EPOLLHUP)
        self.assertEqual(self.seen, ["plain", "hung"])

    def test_a_descriptor_removed_by_an_earlier_handler_is_skipped(self) -> None:
        lean_dispatch(self.reactor)
        first = self.reader("first")
        second = self.reader("second")
        # Whichever runs first removes the other before its turn.
        first.then = lambda: self.reactor.removeReader(second)
        second.then = lambda: self.reactor.removeReader(first)
        self.reactor.doIteration(1)
        self.assertEqual(len(self.seen), 1)

    def test_errors_in_a_handler_still_disconnect_it(self) -> None:
        lean_dispatch(self.reactor)
        broken = self.reader("broken")

        def fail() -> None:
            raise ValueError("protocol bug")

        broken.then = fail
        self.reactor.doIteration(1)
        # Twisted's own handling: logged, and the selectable disconnected.
        self.assertEqual(self.seen, ["broken", "broken lost"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class RecordingPoller:
    """An epoll object that records each C{epoll_ctl} made through it."""

    def __init__(self, poller: Any) -> None:
        self.poller = poller
        self.calls: list[tuple[Any, ...]] = []

    def register(self, fd: int, mask: int) -> None:
        self.calls.append(("add", fd, mask))
        self.poller.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.calls.append(("mod", fd, mask))
        self.poller.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self.calls.append(("del", fd))
        self.poller.unregister(fd)

    def poll(self, timeout: float, most: int) -> Any:
        return self.poller.poll(timeout, most)

    def close(self) -> None:
        self.poller.close()


class Conn(tcp.Connection):
    """A connected TCP transport over one end of a socket pair; counts writes."""

    writes = 0

    def doWrite(self) -> Any:
        self.writes += 1
        return super().doWrite()


IN = select.EPOLLIN
OUT = select.EPOLLOUT


class WriterCoalescingTests(SynchronousTestCase):
    """
    Writer removals held until the next poll, sequence by sequence: what
    reaches epoll, and what the reactor and the kernel watch afterwards.

    | in one turn                          | epoll_ctl                  |
    |--------------------------------------|----------------------------|
    | removeWriter, addWriter              | none, still writable       |
    | removeWriter                         | MOD/DEL before the poll    |
    | removeWriter, connectionLost         | DEL before the close       |
    | ... then a new connection, same fd   | ADD for it, its reads come |
    | abortConnection, its connectionLost  | DEL before the close       |
    | removeWriter, removeReader           | MOD, DEL (Twisted's order) |
    | removeWriter, addReader              | DEL, ADD (Twisted's order) |
    | removeAll / getWriters               | applied first              |
    | not a connected TCP connection       | at once, as Twisted        |
    """

    def setUp(self) -> None:
        self.reactor: Any = epollreactor.EPollReactor()
        self.poller = RecordingPoller(self.reactor._poller)
        self.reactor._poller = self.poller
        self.addCleanup(self.poller.close)
        self.assertTrue(lean_dispatch(self.reactor))
        self.parts = epoll_parts(self.reactor)
        self.assertIs(self.parts.poller, self.poller)

    def conn(self, reading: bool = True, writing: bool = True) -> tuple[Conn, Any]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        self.addCleanup(theirs.close)
        protocol = Protocol()
        conn = Conn(ours, protocol, self.reactor)
        conn.connected = 1
        protocol.makeConnection(conn)
        self.addCleanup(self.lose, conn)
        if reading:
            conn.startReading()
        if writing:
            conn.startWriting()
        self.poller.calls.clear()
        return conn, theirs

    def lose(self, conn: Conn) -> None:
        if not conn.disconnected:
            conn.connectionLost(Failure(ConnectionDone()))

    def watched(self, fd: int) -> tuple[bool, bool]:
        """(reading, writing) as the reactor's own records say."""
        reads = fd in [r.fileno() for r in self.reactor.getReaders()]
        return reads, fd in self.parts.writers

    def test_remove_then_add_costs_nothing_and_stays_writable(self) -> None:
        conn, _ = self.conn()
        fd = conn.fileno()
        conn.stopWriting()
        conn.startWriting()
        self.assertEqual(self.poller.calls, [])
        self.reactor.doIteration(1)
        self.assertEqual(conn.writes, 1)  # the writability event came
        self.assertIs(self.parts.selectables[fd], conn)

    def test_a_wake_that_asks_again_costs_nothing(self) -> None:
        # doWrite with an empty buffer drops write interest; a pull
        # producer (sockd's sendfile) asks for it again in the same call.
        conn, _ = self.conn()
        asked: list[int] = []

        @implementer(IPullProducer)
        class Again:
            def resumeProducing(self) -> None:
                asked.append(1)
                conn.startWriting()

            def stopProducing(self) -> None:
                pass

        conn.registerProducer(Again(), False)
        self.poller.calls.clear()
        for _ in range(5):
            self.reactor.doIteration(1)
        self.assertEqual(conn.writes, 5)
        self.assertGreaterEqual(len(asked), 5)
        self.assertEqual(self.poller.calls, [])

    def test_remove_alone_applies_before_the_next_poll(self) -> None:
        conn, _ = self.conn()
        fd = conn.fileno()
        conn.stopWriting()
        self.assertEqual(self.poller.calls, [])
        self.reactor.doIteration(0)
        self.assertEqual(self.poller.calls, [("mod", fd, IN)])
        self.assertEqual(conn.writes, 0)  # no event from the old interest
        self.assertEqual(self.watched(fd), (True, False))

    def test_write_only_remove_alone_unregisters(self) -> None:
        conn, _ = self.conn(reading=False)
        fd = conn.fileno()
        conn.stopWriting()
        self.reactor.doIteration(0)
        self.assertEqual(self.poller.calls, [("del", fd)])
        self.assertNotIn(fd, self.parts.selectables)
        self.assertEqual(conn.writes, 0)

    def test_connection_lost_then_fd_reused_in_the_same_turn(self) -> None:
        conn, _ = self.conn(reading=False)
        fd = conn.fileno()
        conn.stopWriting()
        self.lose(conn)  # closes its socket
        self.assertEqual(self.poller.calls, [("del", fd)])
        self.assertNotIn(fd, self.parts.selectables)
        # The next socket gets the lowest free number: the same one.
        new, theirs = self.conn(writing=False)
        self.assertEqual(new.fileno(), fd)
        got: list[bytes] = []
        new.protocol.dataReceived = got.append  # type: ignore[method-assign]
        theirs.send(b"hello")
        self.reactor.doIteration(1)
        self.assertEqual(got, [b"hello"])
        self.assertIs(self.parts.selectables[fd], new)
        self.assertEqual(self.watched(fd), (True, False))

    def test_abort_then_fd_reused(self) -> None:
        conn, _ = self.conn()
        fd = conn.fileno()
        conn.abortConnection()
        self.assertEqual(self.poller.calls, [("mod", fd, OUT)])  # reader at once
        self.reactor.runUntilCurrent()  # its connectionLost, before the poll
        self.assertEqual(self.poller.calls, [("mod", fd, OUT), ("del", fd)])
        new, theirs = self.conn(writing=False)
        self.assertEqual(new.fileno(), fd)
        theirs.send(b"x")
        self.reactor.doIteration(1)
        self.assertEqual(self.poller.calls, [])
        self.assertIs(self.parts.selectables[fd], new)

    def test_remove_writer_then_reader(self) -> None:
        conn, _ = self.conn()
        fd = conn.fileno()
        conn.stopWriting()
        conn.stopReading()
        self.assertEqual(self.poller.calls, [("mod", fd, IN), ("del", fd)])
        self.assertNotIn(fd, self.parts.selectables)
        self.reactor.doIteration(0)
        self.assertEqual(len(self.poller.calls), 2)

    def test_remove_writer_then_add_reader(self) -> None:
        conn, _ = self.conn(reading=False)
        fd = conn.fileno()
        conn.stopWriting()
        conn.startReading()
        self.assertEqual(self.poller.calls, [("del", fd), ("add", fd, IN)])
        self.assertEqual(self.watched(fd), (True, False))

    def test_readers_are_never_held(self) -> None:
        conn, _ = self.conn(writing=False)
        fd = conn.fileno()
        conn.stopReading()
        self.assertEqual(self.poller.calls, [("del", fd)])

    def test_remove_all_and_get_writers_see_the_truth(self) -> None:
        conn, _ = self.conn()
        other, _ = self.conn(reading=False)
        conn.stopWriting()
        other.stopWriting()
        self.assertNotIn(conn, self.reactor.getWriters())
        self.assertEqual(len(self.poller.calls), 2)  # both applied
        self.assertIn(conn, self.reactor.getReaders())
        conn.startWriting()
        other.startWriting()
        conn.stopWriting()
        other.stopWriting()
        fds = conn.fileno(), other.fileno()
        removed = self.reactor.removeAll()
        self.assertIn(conn, removed)  # a reader still
        self.assertNotIn(other, removed)
        self.assertFalse(set(fds) & set(self.parts.selectables))

    def test_a_held_connection_whose_number_changed(self) -> None:
        # Not what a TCP connection does; settled under the old number.
        conn, _ = self.conn(reading=False)
        fd = conn.fileno()
        conn.stopWriting()
        conn.fileno = lambda: -1  # type: ignore[method-assign]
        self.reactor.removeReader(conn)
        self.assertEqual(self.poller.calls, [("del", fd)])
        self.assertNotIn(fd, self.parts.selectables)

    def test_others_are_removed_at_once(self) -> None:
        seen: list[str] = []
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        plain = Reader(ours, seen, "plain")
        self.reactor.addWriter(plain)
        self.reactor.removeWriter(plain)
        self.assertEqual(self.poller.calls[-1], ("del", ours.fileno()))
        # A TCP client still connecting (its socket may yet be replaced).
        connecting, _ = self.conn(reading=False)
        connecting.connected = 0
        connecting.stopWriting()
        self.assertEqual(self.poller.calls, [("del", connecting.fileno())])

    def test_sendfile_wakes_make_no_epoll_ctl(self) -> None:
        size = 8 * 1024 * 1024
        path = self.mktemp()
        data = os.urandom(size)
        with open(path, "wb") as f:
            f.write(data)
        conn, theirs = self.conn(reading=False, writing=False)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        received = bytearray()
        sink = Reader(theirs, [], "sink")
        sink.doRead = lambda: received.extend(theirs.recv(1 << 20))  # type: ignore[method-assign]
        self.reactor.addReader(sink)
        self.addCleanup(self.reactor.removeReader, sink)
        producer = SendfileProducer(os.open(path, os.O_RDONLY), 0, size, Clock())
        done = producer.start(conn)
        self.poller.calls.clear()
        writes = 0
        for _ in range(20000):
            if len(received) >= size:
                break
            self.reactor.doIteration(1)
        writes = conn.writes
        self.assertEqual(bytes(received), data)
        self.assertEqual(self.successResultOf(done), size)
        self.assertGreater(writes, 10)
        # Only the end of the transfer: write interest dropped once.
        self.assertEqual(self.poller.calls, [("del", conn.fileno())])

    def test_chunk_producer_turns_make_no_epoll_ctl(self) -> None:
        # The fallback writes a chunk per turn from a timer: the removal its
        # drained write asked for is cancelled by the next chunk's write.
        size = 4 * 1024 * 1024
        path = self.mktemp()
        data = os.urandom(size)
        with open(path, "wb") as f:
            f.write(data)
        conn, theirs = self.conn(reading=False, writing=False)
        received = bytearray()
        sink = Reader(theirs, [], "sink")
        sink.doRead = lambda: received.extend(theirs.recv(1 << 20))  # type: ignore[method-assign]
        self.reactor.addReader(sink)
        self.addCleanup(self.reactor.removeReader, sink)
        producer = ChunkProducer(os.open(path, os.O_RDONLY), 0, size, self.reactor)
        done = producer.start(conn)
        self.poller.calls.clear()
        for _ in range(20000):
            if len(received) >= size:
                break
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(0.1)
        self.assertEqual(bytes(received), data)
        self.assertEqual(self.successResultOf(done), size)
        self.assertGreater(conn.writes, 10)
        # Write interest asked for once, dropped once.
        self.assertEqual(
            self.poller.calls, [("add", conn.fileno(), OUT), ("del", conn.fileno())]
        )
