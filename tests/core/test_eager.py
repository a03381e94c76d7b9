"""
Tests for L{sockd.core.eager}: in memory for the fallbacks, and over real
loopback TCP connections under the real reactor for the socket path.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import (
    DatagramProtocol,
    Factory,
    Protocol,
    connectionDone,
)
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sockd.core import _twisted
from sockd.core._twisted import queued_bytes
from sockd.core.eager import can_write_eagerly, eager_write, send_datagram
from tests.helpers import ReactorTest, reactor_test

reactor: Any = _reactor


class FallbackTests(SynchronousTestCase):
    """Transports that are not plain TCP get C{transport.write}."""

    def test_string_transport(self) -> None:
        transport = StringTransport()
        self.assertFalse(can_write_eagerly(transport))
        eager_write(transport, b"one\n")
        eager_write(transport, b"two\n")
        self.assertEqual(transport.value(), b"one\ntwo\n")

    def test_subclass_is_not_trusted(self) -> None:
        # A subclass of a TCP transport may override write (TLS does); it
        # must not be bypassed even if it looks idle.
        from twisted.internet import tcp

        class Wrapped(tcp.Server):
            def __init__(self) -> None:
                self.written: list[bytes] = []

            def write(self, data: bytes) -> None:
                self.written.append(data)

        transport = Wrapped()
        self.assertFalse(can_write_eagerly(transport))
        eager_write(transport, b"x")
        self.assertEqual(transport.written, [b"x"])

    def test_empty(self) -> None:
        transport = StringTransport()
        eager_write(transport, b"")
        self.assertEqual(transport.value(), b"")


class Peer(Protocol):
    """Collects what arrives; fires Deferreds on amounts and on close."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.waiting: list[tuple[int, Deferred[bytes]]] = []
        self.lost: Deferred[BaseException | None] = Deferred()
        self.connected_d: Deferred[Peer] = Deferred()

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        still = []
        for count, d in self.waiting:
            if len(self.received) >= count:
                d.callback(bytes(self.received))
            else:
                still.append((count, d))
        self.waiting = still

    def receive(self, count: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if len(self.received) >= count:
            d.callback(bytes(self.received))
        else:
            self.waiting.append((count, d))
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(reason.value)


@implementer(IHalfCloseableProtocol)
class HalfClosePeer(Peer):
    """A server side that answers once the client has finished sending."""

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        eager_write(self.transport, bytes(self.received).upper())
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class RealSocketTests(ReactorTest):
    """A server and a client protocol over loopback, real reactor."""

    async def connect(self, server_class: type[Peer] = Peer) -> tuple[Peer, Peer]:
        servers: list[Peer] = []
        server_ready: Deferred[Peer] = Deferred()

        class ServerFactory(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> Peer:
                protocol = server_class()
                protocol.connected_d.chainDeferred(server_ready)
                servers.append(protocol)
                return protocol

        port = reactor.listenTCP(0, ServerFactory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await connectProtocol(endpoint, Peer())
        assert isinstance(client, Peer)
        server = await server_ready
        self.addCleanup(self._abort, client, server)
        return server, client

    async def connect_raw(self) -> tuple[Peer, socket.socket]:
        """A server protocol and a plain blocking client socket."""
        server_ready: Deferred[Peer] = Deferred()

        class ServerFactory(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> Peer:
                protocol = Peer()
                protocol.connected_d.chainDeferred(server_ready)
                return protocol

        port = reactor.listenTCP(0, ServerFactory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # The kernel completes a loopback handshake by itself.
        client = socket.create_connection(("127.0.0.1", port.getHost().port), 5)
        self.addCleanup(client.close)
        server = await server_ready
        self.addCleanup(self._abort, server)
        return server, client

    async def _abort(self, *peers: Peer) -> None:
        for p in peers:
            transport: Any = p.transport
            if transport is not None and transport.connected:
                transport.abortConnection()
        for p in peers:
            await p.lost

    @staticmethod
    def queued(transport: Any) -> int:
        return queued_bytes(transport)

    @reactor_test()
    async def test_sent_at_once(self) -> None:
        """An idle connection's write leaves nothing queued: it went out."""
        server, client = await self.connect()
        transport: Any = server.transport
        self.assertTrue(can_write_eagerly(transport))
        eager_write(transport, b"hello\n")
        self.assertEqual(self.queued(transport), 0)
        self.assertEqual(await client.receive(6), b"hello\n")

    @reactor_test()
    async def test_stock_write_when_twisted_changed(self) -> None:
        """Without the transport internals checked, every write is queued."""
        server, client = await self.connect()
        transport: Any = server.transport
        checked = _twisted.fast_paths()
        _twisted.checked = dataclasses.replace(checked, tcp_write=False)
        self.addCleanup(setattr, _twisted, "checked", checked)
        self.assertFalse(can_write_eagerly(transport))
        eager_write(transport, b"hello\n")
        self.assertEqual(self.queued(transport), 6)
        self.assertEqual(await client.receive(6), b"hello\n")

    @reactor_test()
    async def test_order_with_queued_writes(self) -> None:
        """Data already queued by transport.write is never overtaken."""
        server, client = await self.connect()
        transport: Any = server.transport
        transport.write(b"first ")
        self.assertFalse(can_write_eagerly(transport))
        eager_write(transport, b"second ")
        self.assertEqual(self.queued(transport), 13)
        expected = b"first second "
        self.assertEqual(await client.receive(len(expected)), expected)
        # Drained: eager again, and still in order.
        self.assertTrue(can_write_eagerly(transport))
        eager_write(transport, b"third")
        self.assertEqual(self.queued(transport), 0)
        self.assertEqual(await client.receive(18), b"first second third")

    @reactor_test()
    async def test_large_write_partly_sent(self) -> None:
        """What the kernel does not take is queued, then delivered whole."""
        server, client = await self.connect()
        transport: Any = server.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        data = bytes(range(256)) * (16 * 1024)  # 4 MiB, patterned
        eager_write(transport, data)
        queued = self.queued(transport)
        self.assertGreater(queued, 0)
        self.assertLess(queued, len(data))
        eager_write(transport, b"tail")
        self.assertEqual(self.queued(transport), queued + 4)
        received = await client.receive(len(data) + 4)
        self.assertEqual(received, data + b"tail")

    @reactor_test()
    async def test_backpressure(self) -> None:
        """
        With the transport registered as a streaming producer on itself (as
        GuardedProtocol does), a peer that never reads still pauses reading
        and the queue stays bounded.
        """
        server, client = await self.connect()
        transport: Any = server.transport
        transport.registerProducer(transport, True)
        client.transport.pauseProducing()  # type: ignore[union-attr]
        chunk = b"x" * 65536
        for _ in range(2000):  # at most 125 MiB
            eager_write(transport, chunk)
            if transport.producerPaused:
                break
        self.assertTrue(transport.producerPaused)
        self.assertLessEqual(self.queued(transport), transport.bufferSize + len(chunk))
        # While paused, nothing goes out eagerly.
        self.assertFalse(can_write_eagerly(transport))
        sent_before = self.queued(transport)
        eager_write(transport, b"y")
        self.assertEqual(self.queued(transport), sent_before + 1)

    @reactor_test()
    async def test_lose_connection_delivers_everything(self) -> None:
        """loseConnection after eager and queued writes sends all, then closes."""
        server, client = await self.connect()
        transport: Any = server.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        big = b"0123456789abcdef" * 65536  # 1 MiB
        eager_write(transport, b"start\n")
        eager_write(transport, big)
        eager_write(transport, b"end\n")
        transport.loseConnection()
        self.assertFalse(can_write_eagerly(transport))
        eager_write(transport, b"after close\n")  # queued: still delivered
        reason = await client.lost
        self.assertIsInstance(reason, ConnectionDone)
        self.assertEqual(
            bytes(client.received), b"start\n" + big + b"end\nafter close\n"
        )

    @reactor_test()
    async def test_half_close(self) -> None:
        """A client that shuts its sending side still gets every answer."""
        server, client = await self.connect(HalfClosePeer)
        client.transport.write(b"abc\n" * 1000)  # type: ignore[union-attr]
        client.transport.loseWriteConnection()  # type: ignore[attr-defined]
        reason = await client.lost
        self.assertIsInstance(reason, ConnectionDone)
        self.assertEqual(bytes(client.received), b"ABC\n" * 1000)

    @reactor_test()
    async def test_own_write_side_closed(self) -> None:
        """After loseWriteConnection nothing is sent eagerly."""
        server, client = await self.connect()
        transport: Any = server.transport
        transport.loseWriteConnection()
        self.assertFalse(can_write_eagerly(transport))

    @reactor_test()
    async def test_pull_producer_is_left_to_the_queue(self) -> None:
        """A pull producer is only asked for more when a queued write drains."""
        server, client = await self.connect()
        transport: Any = server.transport
        chunks = [b"a" * 1000, b"b" * 1000, b"c" * 1000]

        class Pull:
            def resumeProducing(self) -> None:
                if chunks:
                    self.assert_queued()
                    eager_write(transport, chunks.pop(0))
                else:
                    transport.unregisterProducer()

            def assert_queued(self) -> None:
                assert not can_write_eagerly(transport)

            def stopProducing(self) -> None:
                pass

        transport.registerProducer(Pull(), False)
        received = await client.receive(3000)
        self.assertEqual(received, b"a" * 1000 + b"b" * 1000 + b"c" * 1000)

    @reactor_test()
    async def test_peer_reset(self) -> None:
        """A send error is left to the transport: connection lost, no raise."""
        server, client = await self.connect_raw()
        transport: Any = server.transport
        transport.stopReading()  # so only the write can discover the reset
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST, at once, on loopback
        eager_write(transport, b"into the void\n")
        self.assertFalse(transport.disconnected)  # not yet: the reactor finds it
        reason = await server.lost
        self.assertIsInstance(reason, ConnectionLost)


class Recorder:
    """A datagram transport that records what it is asked to send."""

    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any = None) -> None:
        self.written.append((data, addr))


class DatagramTests(ReactorTest):
    """L{send_datagram} over a real UDP port, and its fallback."""

    def test_fallback(self) -> None:
        transport = Recorder()
        send_datagram(transport, b"x", ("127.0.0.1", 5))
        self.assertEqual(transport.written, [(b"x", ("127.0.0.1", 5))])

    @reactor_test()
    async def test_reply(self) -> None:
        """A reply reaches the sender, and errors are Twisted's own."""
        received: Deferred[tuple[bytes, Any]] = Deferred()
        errors: list[BaseException] = []

        class Echo(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                send_datagram(self.transport, data.upper(), addr)
                try:
                    # Port 0 cannot be sent to: the error comes from
                    # transport.write, as it would without send_datagram.
                    send_datagram(self.transport, b"x", (addr[0], 0))
                except OSError as e:
                    errors.append(e)
                received.callback((data, addr))

        port = reactor.listenUDP(0, Echo(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(client.close)
        client.settimeout(5)
        client.sendto(b"ping", ("127.0.0.1", port.getHost().port))
        data, addr = await received
        self.assertEqual(data, b"ping")
        self.assertEqual(client.recv(100), b"PING")
        self.assertEqual(len(errors), 1)


class EchoUsesEagerWritesTests(ReactorTest):
    """The echo protocols answer through the eager path, not the queue."""

    async def check(self, mode: str, request: bytes, answer: bytes) -> None:
        from sockd.echo.protocol import EchoFactory
        from tests.helpers import settings

        accepted: Deferred[Any] = Deferred()

        class Recording(EchoFactory):
            def buildProtocol(self, addr: Any) -> Any:
                protocol = super().buildProtocol(addr)
                # Connected (transport set) once this call has returned.
                reactor.callLater(0, accepted.callback, protocol)
                return protocol

        factory = Recording(settings(echo={"mode": mode}).echo, reactor)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await connectProtocol(endpoint, Peer())
        assert isinstance(client, Peer)
        server = await accepted
        transport: Any = server.transport
        self.addCleanup(self._abort, client, transport)
        queued: list[bytes] = []
        plain_write = transport.write

        def write(data: bytes) -> None:
            queued.append(data)
            plain_write(data)

        transport.write = write
        client.transport.write(request)  # type: ignore[union-attr]
        self.assertEqual(await client.receive(len(answer)), answer)
        self.assertEqual(queued, [])

    async def _abort(self, client: Peer, transport: Any) -> None:
        transport.abortConnection()
        await client.lost

    @reactor_test()
    async def test_line(self) -> None:
        await self.check("line", b"one\ntwo\r\n", b"ONE\nTWO\r\n")

    @reactor_test()
    async def test_raw(self) -> None:
        await self.check("raw", b"abc", b"ABC")
