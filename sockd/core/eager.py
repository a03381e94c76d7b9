"""
Eager writes: send at once when a TCP transport has nothing queued.

Stock Twisted queues every C{write} and sends it on the next reactor turn,
asking epoll for write readiness and dropping the request again afterwards
(two C{epoll_ctl} calls per reply).  L{eager_write} instead sends straight
away on the socket when the transport's buffers are empty, as asyncio does,
and hands only what the kernel did not take to C{transport.write}, so
ordering, producers (backpressure), C{loseConnection} and half-close keep
working through Twisted's own write path.

L{send_datagram} is the UDP counterpart: a reply to the address a datagram
came from goes straight to C{sendto}, skipping C{udp.Port.write}'s textual
re-validation of an address the kernel has just given us.

Behind a C{haproxy:} listener the transport is the PROXY header wrapper,
whose C{write} only passes bytes on: L{unwrap} reaches the TCP transport
under it, so the fast paths keep working there.

Anything it does not recognise exactly (TLS, UNIX sockets, test transports,
other reactors' transports) simply gets C{transport.write}, and so does a
connection with a pull producer or a paused one.  So does everything when
the Twisted in use fails L{sockd.core._twisted}'s check of the transport
internals read here.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp, udp

from sockd.core import _twisted
from sockd.core._twisted import fast_paths, udp_connected, write_idle
from sockd.core.interfaces import PeerAddress
from sockd.core.proxy import ProxyHeaderProtocol

__all__ = ["can_write_eagerly", "eager_write", "send_datagram", "unwrap"]

# Exactly these classes: a subclass may override write() (TLS wrappers do).
_PLAIN_TCP = frozenset({tcp.Server, tcp.Client})


def unwrap(transport: Any) -> Any:
    """
    The transport under a PROXY header wrapper (whose writes, producers and
    closes only pass through to it), else C{transport} itself.
    """
    if type(transport) is ProxyHeaderProtocol:
        return transport.transport
    return transport


def can_write_eagerly(transport: Any) -> bool:
    """
    Whether C{transport} is a plain TCP connection with nothing queued, open
    in both directions, with no close requested: only then can bytes go
    straight to the socket without overtaking anything.
    """
    return (
        type(transport) in _PLAIN_TCP
        and (_twisted.checked or fast_paths()).tcp_write
        and write_idle(transport)
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
        # A pull producer is asked for more only when a queued write drains,
        # and a paused push producer is resumed the same way: leave both to
        # the queue.
        and (transport.producer is None or transport.streamingProducer)
        and not transport.producerPaused
    )


def eager_write(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}: as much as the kernel takes at once when
    nothing is queued, the rest (or all of it) through C{transport.write}.
    """
    if type(transport) is not tcp.Server:
        transport = unwrap(transport)
    if data and can_write_eagerly(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN (kernel buffer full), EINTR: queue it all.  EPIPE,
            # ECONNRESET...: queue it too, so the transport's own doWrite
            # meets the error and runs the connection-lost machinery.
            sent = 0
        if sent >= len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


def send_datagram(transport: Any, data: bytes, addr: PeerAddress) -> None:
    """
    Send C{data} to C{addr}, an address C{transport} received a datagram
    from.  Errors are those of C{transport.write(data, addr)}: any failure
    is retried through it, so it raises exactly what Twisted would.
    """
    if (
        type(transport) is udp.Port
        and (_twisted.checked or fast_paths()).udp_send
        and not udp_connected(transport)
    ):
        try:
            transport.socket.sendto(data, addr)
            return
        except OSError:
            pass
    transport.write(data, addr)
