"""Tests of sockd.core.epoll: direct event dispatch on a private epoll reactor."""

from __future__ import annotations

import select
import socket
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sockd.core._twisted import epoll_parts
from sockd.core.epoll import lean_dispatch

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
