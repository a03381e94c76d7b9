"""
Twisted's private internals, in one place, checked once per process.

sockd's fast paths read a few attributes Twisted does not promise to keep.
Each accessor below names them and the Twisted releases they were checked
on (L{CHECKED_ON}).  L{fast_paths} runs L{self_check} the first time it is
asked: every group of internals is exercised on objects of its own (a
socket pair, a throwaway epoll reactor), and a group that is missing or
behaves differently switches its fast path off, said in one log line.  The
fallbacks are Twisted's stock paths: C{transport.write}, Twisted's own
C{doIteration} and writer methods, and the systemd record rebuilt through the public
C{systemd:} endpoint parser.

Other modules reach Twisted's internals only through these accessors.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from twisted.internet import tcp, udp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import Logger
from twisted.python.systemd import ListenFDs

from sockd.core.reactors import StandInReactor

__all__ = [
    "CHECKED_ON",
    "EpollParts",
    "FastPaths",
    "checked",
    "epoll_parts",
    "fast_paths",
    "is_connected_tcp",
    "patch_reactor",
    "queued_bytes",
    "self_check",
    "systemd_record",
    "udp_connected",
    "write_idle",
]

log = Logger(namespace="sockd")

#: the Twisted releases these accessors were checked on, oldest to newest
CHECKED_ON = "24.3.0 to 26.10.0"

#: the most inherited sockets the public systemd fallback looks for
_MAX_SYSTEMD_SOCKETS = 1024


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths this process uses; off means Twisted's stock path."""

    #: eager TCP writes and sendfile: the transport's write buffer is visible
    tcp_write: bool
    #: UDP replies straight to C{sendto}: a port's connected address is visible
    udp_send: bool
    #: epoll events dispatched without a logging context each, and writer
    #: removals held until the next poll (L{sockd.core.epoll})
    epoll_dispatch: bool
    #: Twisted's own record of the sockets systemd passed is readable
    systemd_record: bool
    #: what was found different, one phrase per internal
    problems: tuple[str, ...] = ()


# --- accessors ---------------------------------------------------------------


def queued_bytes(transport: Any) -> int:
    """
    How many bytes a TCP transport (C{abstract.FileDescriptor}) holds unsent:
    C{dataBuffer} past C{offset}, plus C{_tempDataLen} (writes not yet
    joined into it).  Checked on Twisted L{CHECKED_ON}.
    """
    queued: int = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    return queued


def write_idle(transport: Any) -> bool:
    """
    Whether a TCP transport has nothing queued and no half-close requested
    or done (C{_writeDisconnecting}, C{_writeDisconnected}).  Checked on
    Twisted L{CHECKED_ON}.
    """
    return not (
        transport.dataBuffer
        or transport._tempDataLen
        or transport._writeDisconnecting
        or transport._writeDisconnected
    )


def udp_connected(port: Any) -> bool:
    """
    Whether a C{udp.Port} was C{connect}ed to one address
    (C{_connectedAddr}).  Checked on Twisted L{CHECKED_ON}.
    """
    return port._connectedAddr is not None


class EpollParts(NamedTuple):
    """What an epoll reactor dispatches with."""

    #: the C{select.epoll} object (C{_poller})
    poller: Any
    #: descriptor -> selectable being watched (C{_selectables})
    selectables: dict[int, Any]
    #: C{(selectable, fd, event)}: the reactor's handling of one event
    #: (C{_doReadOrWrite}), without C{callWithLogger} around it
    dispatch: Any
    #: C{(selectable, why, isRead)}: what C{_doReadOrWrite} does with a
    #: C{doRead} that returned or raised C{why} (C{_disconnectSelectable})
    disconnect: Any
    #: the event mask of "readable" alone (C{_POLL_IN})
    readable: int
    #: descriptors registered for writability (C{_writes}), a subset of
    #: C{selectables}' keys
    writers: set[int]


def epoll_parts(reactor: Any) -> EpollParts:
    """
    The internals of an C{EPollReactor} its C{doPoll} and C{removeWriter}
    use.  Checked on Twisted L{CHECKED_ON}.
    """
    return EpollParts(
        reactor._poller,
        reactor._selectables,
        reactor._doReadOrWrite,
        reactor._disconnectSelectable,
        reactor._POLL_IN,
        reactor._writes,
    )


def patch_reactor(reactor: Any, **methods: Callable[..., Any]) -> None:
    """
    Give one reactor instance these methods, over its class's: the epoll
    reactor's own code calls them by these names (C{doIteration} from
    C{mainLoop}, C{removeWriter} from C{doWrite}, ...).  Checked on Twisted
    L{CHECKED_ON}.
    """
    for name, method in methods.items():
        setattr(reactor, name, method)


def is_connected_tcp(selectable: object) -> bool:
    """
    Whether C{selectable} is a connected TCP connection (C{tcp.Connection}),
    whose socket closes only in C{connectionLost}, after C{removeReader}.
    """
    return isinstance(selectable, tcp.Connection) and bool(selectable.connected)


def systemd_record() -> ListenFDs:
    """
    The sockets systemd passed this process, as Twisted read them (taking
    C{LISTEN_PID} and C{LISTEN_FDS} out of the environment) when
    C{twisted.internet.endpoints} was imported: C{_SystemdParser._sddaemon},
    checked on Twisted L{CHECKED_ON}.  Without it, the same record is rebuilt
    through Twisted's public C{systemd:} endpoint parser.
    """
    if fast_paths().systemd_record:
        from twisted.internet import endpoints

        record: ListenFDs = endpoints._SystemdParser._sddaemon
        return record
    return _systemd_record_from_parser()


def _systemd_record_from_parser() -> ListenFDs:
    from twisted.internet.endpoints import serverFromString

    descriptors: list[int] = []
    for index in range(_MAX_SYSTEMD_SOCKETS):
        try:
            endpoint: Any = serverFromString(
                StandInReactor(), f"systemd:domain=INET:index={index}"
            )
        except Exception:  # IndexError past the last one
            break
        descriptors.append(endpoint.fileno)
    # Twisted leaves the names in the environment.
    names = tuple(os.environ.get("LISTEN_FDNAMES", "").split(":"))
    return ListenFDs(descriptors, names if len(names) == len(descriptors) else ())


# --- the check ---------------------------------------------------------------

#: L{self_check}'s last answer; None before the first check (hot paths read
#: it as C{checked or fast_paths()}, saving a call)
checked: FastPaths | None = None


def fast_paths() -> FastPaths:
    """The fast paths in use: L{self_check}'s answer, checked once."""
    return checked if checked is not None else self_check()


def self_check() -> FastPaths:
    """
    Exercise each group of internals; switch off the fast path of any that
    is missing or behaves differently, and say so in one log line.
    """
    global checked
    problems: list[str] = []

    def passes(name: str, check: Callable[[], str | None]) -> bool:
        try:
            problem: str | None = check()
        except Exception as e:
            problem = f"{type(e).__name__}: {e}"
        if problem is not None:
            problems.append(f"{name}: {problem}")
        return problem is None

    tcp_write = passes("TCP write buffer", _check_tcp)
    udp_send = passes("UDP connected address", _check_udp)
    epoll_dispatch = _epoll_available() and passes("epoll dispatch", _check_epoll)
    systemd = passes("systemd record", _check_systemd)
    checked = FastPaths(tcp_write, udp_send, epoll_dispatch, systemd, tuple(problems))
    if problems:
        from twisted import __version__

        off = [
            what
            for what, on in [
                ("eager TCP writes and sendfile", tcp_write),
                ("direct UDP replies", udp_send),
                ("lean epoll dispatch", epoll_dispatch or not _epoll_available()),
                ("reading Twisted's systemd record", systemd),
            ]
            if not on
        ]
        log.warn(
            "sockd: Twisted {version} differs from the releases sockd was "
            "checked on ({checked}): {problems}; using Twisted's stock path "
            "instead of: {off}",
            version=__version__,
            checked=CHECKED_ON,
            problems="; ".join(problems),
            off=", ".join(off),
        )
    return checked


def _check_tcp() -> str | None:
    ours, theirs = socket.socketpair()
    try:
        theirs.setblocking(False)
        inert: Any = StandInReactor()  # Twisted wants an IReactorFDSet
        transport = tcp.Connection(ours, Protocol(), inert)
        transport.connected = True
        # The public attributes eager writes read beside these internals.
        for name in (
            "socket",
            "TLS",
            "producer",
            "streamingProducer",
            "producerPaused",
            "disconnecting",
        ):
            getattr(transport, name)
        if not write_idle(transport) or queued_bytes(transport):
            return "a new connection does not look idle"
        transport.write(b"check")
        if write_idle(transport) or queued_bytes(transport) != 5:
            return f"a queued write counts {queued_bytes(transport)} bytes, not 5"
        transport.doWrite()
        if theirs.recv(16) != b"check" or not write_idle(transport):
            return "a drained buffer does not look idle"
        transport.loseWriteConnection()
        if write_idle(transport):
            return "a requested half-close is not seen"
        transport.doWrite()
        if write_idle(transport) or theirs.recv(16) != b"":
            return "a done half-close is not seen"
        return None
    finally:
        ours.close()
        theirs.close()


class _NoSocket:
    def connect(self, address: object) -> None:
        pass


def _check_udp() -> str | None:
    port: Any = udp.Port(0, DatagramProtocol(), "127.0.0.1", reactor=StandInReactor())
    if udp_connected(port):
        return "a new port looks connected"
    port.socket = _NoSocket()
    port.connect("127.0.0.1", 9)
    if not udp_connected(port):
        return "a connected port does not look connected"
    return None


def _epoll_available() -> bool:
    try:
        import twisted.internet.epollreactor  # noqa: F401
    except ImportError:  # not Linux
        return False
    return True


class _Readable:
    """A socket an epoll reactor watches; counts its reads and writes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0
        self.lost = False
        self.writes = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "sockd-check"

    def doRead(self) -> None:
        self.sock.recv(16)
        self.reads += 1

    def doWrite(self) -> None:
        self.writes += 1

    def connectionLost(self, reason: object) -> None:
        self.lost = True


def _check_epoll() -> str | None:
    from twisted.internet.epollreactor import EPollReactor

    reactor: Any = EPollReactor()
    ours, theirs = socket.socketpair()
    try:
        parts = epoll_parts(reactor)
        mine = ours.fileno()
        readable = _Readable(ours)
        reactor.addReader(readable)
        if parts.selectables.get(mine) is not readable:
            return "a watched descriptor is not among the selectables"
        theirs.send(b"x")
        for ready, event in parts.poller.poll(1.0, max(1, len(parts.selectables))):
            if ready == mine:
                parts.dispatch(readable, ready, event)
        if readable.reads != 1:
            return f"a readable socket was read {readable.reads} times, not once"
        if parts.readable != select.EPOLLIN:
            return f"the read event is {parts.readable}, not EPOLLIN"
        # Write interest, which coalescing writer removals reads.
        reactor.addWriter(readable)
        if mine not in parts.writers or parts.selectables.get(mine) is not readable:
            return "a writer is not among the writers"
        reactor.removeWriter(readable)
        if mine in parts.writers or parts.selectables.get(mine) is not readable:
            return "a removed writer that still reads is not just a reader"
        parts.disconnect(readable, ConnectionDone(), True)
        if not readable.lost:
            return "a disconnected selectable was not told its connection is lost"
        if mine in parts.selectables:
            return "an unwatched descriptor is still among the selectables"
        reactor.addWriter(readable)
        for ready, event in parts.poller.poll(1.0, max(1, len(parts.selectables))):
            if ready == mine:
                parts.dispatch(readable, ready, event)
        if readable.writes != 1:
            return f"a writable socket was written {readable.writes} times, not once"
        reactor.removeWriter(readable)
        if mine in parts.writers or mine in parts.selectables:
            return "a removed writer is still watched"
        return None
    finally:
        ours.close()
        theirs.close()
        _close_reactor(reactor)


def _close_reactor(reactor: Any) -> None:
    # Its epoll object and waker pipe; the reactor never ran.
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        reactor.removeReader(waker)
        waker.connectionLost(None)
    poller = getattr(reactor, "_poller", None)
    if poller is not None:
        poller.close()


def _check_systemd() -> str | None:
    from twisted.internet import endpoints

    parser: Any = endpoints._SystemdParser
    record = parser._sddaemon
    if not isinstance(record, ListenFDs):
        return f"the record is a {type(record).__name__}, not a ListenFDs"
    # It is what Twisted's systemd: parser reads: lend it a marked one.
    mark = -2
    parser._sddaemon = ListenFDs([mark], ("sockd-check",))
    try:
        reactor = StandInReactor()
        found = [
            getattr(endpoints.serverFromString(reactor, description), "fileno", None)
            for description in (
                "systemd:domain=INET:index=0",
                "systemd:domain=INET:name=sockd-check",
            )
        ]
    finally:
        parser._sddaemon = record
    if found != [mark, mark]:
        return "Twisted's systemd: parser does not read it"
    return None
