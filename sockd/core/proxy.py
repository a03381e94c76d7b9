"""
The PROXY protocol (v1 and v2, as HAProxy and nginx send it) in front of a
L{GuardedFactory}: the C{haproxy:} listeners.

Twisted's own wrapper (C{twisted.protocols.haproxy}) builds the service's
protocol before the header arrives, so per-address caps and access lists
would see the proxy's address; it believes a header from anyone; it closes
silently on a bad or missing one, and on a first read shorter than 16
bytes; and it breaks half-close.  L{ProxyHeaderFactory} keeps Twisted's
parsers and its address-reporting wrapper, and instead:

 - from a peer in C{trusted_proxies}: requires the header, waits for it
   (for at most the factory's request timeout), then builds the service's
   protocol for the client the header names;
 - from any other peer: serves it as a direct client, by its own address,
   and refuses it if it starts with a PROXY header;
 - refuses with one C{ERR} line and a log line, counted as C{proxy}.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import (
    HAProxyProtocolWrapper,
    HAProxyWrappingFactory,
)
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from sockd.core.limits import GuardedFactory, GuardedProtocol, host_of, peer_key

__all__ = ["ProxyHeaderFactory", "ProxyHeaderProtocol"]

log = Logger(namespace="sockd")

#: how each version's header starts: v1 a text line, v2 a binary signature
_V1 = V1Parser.PROXYSTR + b" "
_V2 = V2Parser.PREFIX
_SIGNATURES = (_V1, _V2)


def _starts_header(data: bytes) -> bool | None:
    """
    Whether C{data} starts with a PROXY header signature: True, False, or
    None while it is too short to tell.
    """
    if data.startswith(_SIGNATURES):
        return True
    if any(s.startswith(data) for s in _SIGNATURES):
        return None
    return False


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(HAProxyProtocolWrapper):
    """
    One connection to a C{haproxy:} listener: the service's protocol runs
    on it, and it reports the header's addresses as C{getPeer}/C{getHost}.
    """

    factory: ProxyHeaderFactory
    #: the peer is a trusted proxy whose header has not been read yet
    _awaiting = False
    #: the first bytes of a direct client, until they cannot be a header
    _sniffing = False
    _head = b""
    _timer: IDelayedCall | None = None
    _abort: IDelayedCall | None = None

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        # The service's protocol comes once the client is known.
        super().__init__(factory, None)  # type: ignore[arg-type]

    def logPrefix(self) -> str:
        return "ProxyHeader"

    def makeConnection(self, transport: ITransport) -> None:
        # As ProtocolWrapper, but the service's protocol may come later.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        peer = transport.getPeer()
        guarded = self.factory.wrappedFactory
        if guarded.trusted_proxies.permits(host_of(peer)):
            self._awaiting = True
            self._timer = guarded.clock.callLater(
                guarded.request_timeout, self._refuse, "no PROXY header in time"
            )
        else:
            self._sniffing = True
            self._start(peer)

    def _start(self, client: IAddress) -> None:
        protocol = self.factory.wrappedFactory.buildProtocol(client)
        if protocol is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting:
            self._header(data)
        elif self._sniffing:
            self._sniff(data)
        elif self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)

    def _header(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            head = self._head = self._head + data
            starts = _starts_header(head)
            if starts is None:
                return
            if not starts:
                self._refuse("a trusted proxy sent no PROXY header")
                return
            # The v2 signature is followed by the version (2) in the high nibble.
            if head.startswith(_V2):
                if len(head) < len(_V2) + 1:
                    return
                if head[len(_V2)] & 0xF0 != 0x20:
                    self._refuse("unsupported PROXY header version")
                    return
                parser = V2Parser()
            else:
                parser = V1Parser()
            self._parser = parser
            data, self._head = head, b""
        try:
            info, rest = parser.feed(data)
        except InvalidProxyHeader:
            self._refuse("invalid PROXY header")
            return
        if info is None:
            return
        self._awaiting = False
        self._parser = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._proxyInfo = info
        # UNKNOWN (v1) and LOCAL (v2, health checks) name no client: the
        # connection is the proxy's own.
        self._start(self.getPeer())
        if rest and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(rest)

    def _sniff(self, data: bytes) -> None:
        head = self._head + data
        starts = _starts_header(head)
        if starts is None:
            self._head = head
            return
        self._sniffing = False
        self._head = b""
        if starts:
            self._refuse("PROXY header from an address not in trusted_proxies")
        elif self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(head)

    def _refuse(self, reason: str) -> None:
        """Say C{ERR reason} (if nothing was said yet), log, count and close."""
        self._awaiting = self._sniffing = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        guarded = self.factory.wrappedFactory
        transport = self.transport
        assert transport is not None
        key = peer_key(host_of(transport.getPeer()))
        guarded.limiter.refuse("proxy", reason)
        log.warn(
            "{service}: refused {peer}: {reason}",
            service=guarded.service_name,
            peer=key,
            reason=reason,
        )
        protocol = self.wrappedProtocol
        if isinstance(protocol, GuardedProtocol):
            # A direct client's protocol: it closes, releasing its slot.
            protocol.close(guarded.refusal(reason))
            return
        transport.write(guarded.refusal(reason))
        self._abort = guarded.clock.callLater(
            guarded.abort_grace,
            transport.abortConnection,  # type: ignore[attr-defined]
        )
        transport.loseConnection()

    def readConnectionLost(self) -> None:
        protocol = self.wrappedProtocol
        if self._awaiting or protocol is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif IHalfCloseableProtocol.providedBy(protocol):
            protocol.readConnectionLost()
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        protocol = self.wrappedProtocol
        if protocol is not None and IHalfCloseableProtocol.providedBy(protocol):
            protocol.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in (self._timer, self._abort):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._abort = None
        self.factory.unregisterProtocol(self)
        protocol: IProtocol | None = self.wrappedProtocol
        self.wrappedProtocol = None  # type: ignore[assignment]
        if protocol is not None:
            protocol.connectionLost(reason)


class ProxyHeaderFactory(HAProxyWrappingFactory):
    """Reads the PROXY header for a L{GuardedFactory} (see the module)."""

    noisy = False
    wrappedFactory: GuardedFactory

    def __init__(self, wrappedFactory: GuardedFactory) -> None:
        super().__init__(wrappedFactory)

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol:
        return ProxyHeaderProtocol(self)
