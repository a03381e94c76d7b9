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

This patches the one reactor instance rather than installing an
C{EPollReactor} subclass: which reactor runs is twistd's choice (its default,
or C{--reactor}), so a subclass would serve only the deployments that name
it on every command line (each unit file, the workers' launcher), and one
that forgot would lose the speed above without a word.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from twisted.logger import Logger
from twisted.python import log as legacy_log

from sockd.core._twisted import epoll_parts, fast_paths

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
    poller, selectables, handle, disconnect, readable = epoll_parts(reactor)

    def doIteration(timeout: float | None) -> None:
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

    target: Any = reactor  # an instance attribute over the method
    target.doIteration = doIteration
    _switched.add(reactor)
    return True
