"""
Event dispatch for Twisted's epoll reactor without a logging context per
event.

The epoll reactor hands every ready descriptor to its handler through
C{twisted.python.log.callWithLogger}, which asks the connection for its log
prefix and sets up a legacy logging context (the C{system} shown on
old-style C{log.msg} lines) for each single event.  Under load that costs
more than sockd's own echo work: on 100 connections, echo answered 1.17x as
many lines without it in request/response and 1.35x pipelined (alternating
runs of the same daemon).

L{lean_dispatch} gives the reactor a C{doIteration} that waits on the same
epoll object and hands each event to the reactor's own handler directly
(reached through L{sockd.core._twisted}, which checks those internals at
start-up; if they differ, the reactor keeps Twisted's C{doIteration}).  The
only loss is that prefix on legacy log lines written while an event is
handled; sockd's own log events carry their fields.  As before, a handler
that raises is logged and every other ready descriptor is still served.
The most common event, "readable" and nothing else, skips the handler too:
the descriptor's C{doRead} is called here, and what it returns or raises is
logged and disconnected through the reactor's own C{_disconnectSelectable},
exactly as the handler would.

It also holds back writer removals (L{_Writers}).  Twisted's C{doWrite}
drops write interest whenever its buffer empties, and a pull producer that
sends past the buffer (sockd's sendfile) asks for it again in the same
call: two C{epoll_ctl} calls per wake that change nothing (the chunk
fallback's next write, from a timer, does the same before the next poll).
A removal asked for while a TCP connection is connected is held until the
next poll, and the same connection adding its writer back meanwhile
cancels it.  Anything else about that descriptor or selectable (a reader
added or removed, so C{connectionLost}, which removes the reader before
the socket closes; C{removeAll}; C{getWriters}) applies it first, so what
epoll watches and what the reactor reports are what was asked for at
every poll and whenever anyone looks.  Readers are never held.

This patches the one reactor instance rather than installing an
C{EPollReactor} subclass: which reactor runs is twistd's choice (its default,
or C{--reactor}), so a subclass would serve only the deployments that name
it on every command line (each unit file, the workers' launcher), and one
that forgot would lose the speed above without a word.
"""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python import log as legacy_log

from sockd.core._twisted import (
    epoll_parts,
    fast_paths,
    is_connected_tcp,
    patch_reactor,
)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["lean_dispatch"]

log = Logger(namespace="sockd")

#: reactors already switched
_switched: weakref.WeakSet[object] = weakref.WeakSet()


def lean_dispatch(reactor: object) -> bool:
    """
    Switch C{reactor} to the direct dispatch if it is Twisted's epoll
    reactor exactly (a subclass may dispatch its own way) and its internals
    pass the start-up check; True if it was switched now.
    """
    # Every daemon starts here: the one check of Twisted's internals.  (It
    # also finds whether there is an epoll reactor: Linux only.)
    if not fast_paths().epoll_dispatch:
        return False
    from twisted.internet.epollreactor import EPollReactor

    if type(reactor) is not EPollReactor or reactor in _switched:
        return False
    poller, selectables, handle, disconnect, readable, writers = epoll_parts(reactor)
    held = _Writers(reactor, selectables, writers)
    pending = held.pending

    def doIteration(timeout: float | None) -> None:
        if pending:
            held.settle_all(log_errors=True)
        try:
            # At most as many events as descriptors watched, as Twisted asks.
            ready = poller.poll(
                -1 if timeout is None else timeout, max(1, len(selectables))
            )
        except InterruptedError:
            return
        for fd, event in ready:
            # An earlier handler in this batch may have removed it.
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event != readable or selectable.fileno() == -1:
                    handle(selectable, fd, event)
                    continue
                # Readable, nothing else: the reactor's handling of it,
                # without the call and the tests for the other events.
                try:
                    why = selectable.doRead()
                except BaseException:
                    why = sys.exc_info()[1]
                    legacy_log.err()
                if why:
                    disconnect(selectable, why, True)
            except Exception:
                log.failure(
                    "sockd: handling an event on {selectable!r} failed",
                    selectable=selectable,
                )

    patch_reactor(reactor, doIteration=doIteration)
    _switched.add(reactor)
    return True


class _Writers:
    """
    An epoll reactor's writer methods, holding back a TCP connection's
    writer removal until the next poll, or until something else about that
    descriptor or selectable changes (see the module's docstring).
    """

    def __init__(
        self, reactor: Any, selectables: dict[int, Any], writers: set[int]
    ) -> None:
        self._selectables = selectables
        self._writers = writers
        #: descriptor -> the connection whose writer removal is held
        self.pending: dict[int, Any] = {}
        #: id of a connection held -> its descriptor
        self._held: dict[int, int] = {}
        # The reactor's own methods, bound, to apply what is not held.
        self._add_writer: Callable[[Any], None] = reactor.addWriter
        self._remove_writer: Callable[[Any], None] = reactor.removeWriter
        self._add_reader: Callable[[Any], None] = reactor.addReader
        self._remove_reader: Callable[[Any], None] = reactor.removeReader
        self._remove_all: Callable[[], list[Any]] = reactor.removeAll
        self._get_writers: Callable[[], list[Any]] = reactor.getWriters
        patch_reactor(
            reactor,
            addWriter=self.addWriter,
            removeWriter=self.removeWriter,
            addReader=self.addReader,
            removeReader=self.removeReader,
            removeAll=self.removeAll,
            getWriters=self.getWriters,
        )

    def removeWriter(self, writer: Any) -> None:
        """Hold the removal if C{writer} is a connected TCP connection."""
        fd = writer.fileno()
        if self.pending:
            if self.pending.get(fd) is writer:
                return
            self._settle_for(writer, fd)
        if (
            fd in self._writers
            and self._selectables.get(fd) is writer
            and is_connected_tcp(writer)
        ):
            # Its socket closes only in connectionLost, after removeReader,
            # which applies this first.  (docs/performance.md, "Writer
            # removals held until the poll").
            self.pending[fd] = writer
            self._held[id(writer)] = fd
            return
        self._remove_writer(writer)

    def addWriter(self, writer: Any) -> None:
        """Cancel a held removal of C{writer}: it is still registered."""
        if self.pending:
            fd = writer.fileno()
            if self.pending.get(fd) is writer:
                del self.pending[fd]
                del self._held[id(writer)]
                return
            self._settle_for(writer, fd)
        self._add_writer(writer)

    def addReader(self, reader: Any) -> None:
        """Apply what is held for C{reader}'s descriptor, then add it."""
        if self.pending:
            self._settle_for(reader, reader.fileno())
        self._add_reader(reader)

    def removeReader(self, reader: Any) -> None:
        """Apply what is held for C{reader}'s descriptor, then remove it."""
        if self.pending:
            self._settle_for(reader, reader.fileno())
        self._remove_reader(reader)

    def removeAll(self) -> list[Any]:
        """Apply everything held, then Twisted's C{removeAll}."""
        self.settle_all()
        return self._remove_all()

    def getWriters(self) -> list[Any]:
        """Apply everything held, then Twisted's C{getWriters}."""
        self.settle_all()
        return self._get_writers()

    def settle_all(self, log_errors: bool = False) -> None:
        """Apply every held removal (before a poll, or when asked)."""
        while self.pending:
            fd = next(iter(self.pending))
            if not log_errors:
                self._settle(fd)
                continue
            writer = self.pending[fd]
            try:
                self._settle(fd)
            except Exception:
                log.failure(
                    "sockd: removing the writer {writer!r} failed", writer=writer
                )

    def _settle_for(self, selectable: Any, fd: int) -> None:
        # Whoever holds this descriptor, and this selectable under another.
        if fd in self.pending:
            self._settle(fd)
        other = self._held.get(id(selectable))
        if other is not None:
            self._settle(other)

    def _settle(self, fd: int) -> None:
        writer = self.pending.pop(fd)
        del self._held[id(writer)]
        self._remove_writer(writer)
