"""The PROXY header wrapper (sockd.core.proxy), in memory."""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    StringTransportWithDisconnection,
)
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sockd.core.config import EchoSettings, networks
from sockd.core.eager import unwrap
from sockd.core.limits import AccessList
from sockd.core.proxy import ProxyHeaderFactory
from sockd.echo.protocol import EchoFactory
from tests.helpers import ROOT

PROXY = "10.0.0.5"
V1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 9000\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(source: str, port: int, command: int = 0x21) -> bytes:
    """A v2 header: PROXY (0x21) or LOCAL (0x20), TCP over IPv4 or IPv6."""
    if ":" in source:
        body = socket.inet_pton(socket.AF_INET6, source) + bytes(16)
        body += struct.pack("!HH", port, 9000)
        family = 0x21
    else:
        body = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
        body += struct.pack("!HH", port, 9000)
        family = 0x11
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


class ProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.echo = EchoFactory(EchoSettings(max_connections_per_ip=1), self.clock, 2.0)
        self.echo.set_access(
            AccessList(deny=networks("198.51.100.0/24", ROOT)),
            AccessList(networks(f"{PROXY}/32", ROOT)),
        )
        self.factory = ProxyHeaderFactory(self.echo)
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def connect(
        self, peer: str = PROXY
    ) -> tuple[Any, StringTransportWithDisconnection]:
        addr = IPv4Address("TCP", peer, 50000)
        protocol = self.factory.buildProtocol(addr)
        transport = StringTransportWithDisconnection(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 9000), peerAddress=addr
        )
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def logs(self) -> list[str]:
        return [formatEvent(e) for e in self.logged]

    def test_v1_split_at_every_byte(self) -> None:
        for split in range(1, len(V1)):
            protocol, transport = self.connect()
            self.assertIsNone(protocol.wrappedProtocol)  # nothing built yet
            protocol.dataReceived(V1[:split])
            protocol.dataReceived(V1[split:] + b"hi\n")
            self.assertEqual(transport.value(), b"HI\n", split)
            self.assertEqual(protocol.getPeer(), IPv4Address("TCP", "192.0.2.7", 40001))
            self.assertEqual(protocol.wrappedProtocol._key, "192.0.2.7")
            transport.loseConnection()
        self.assertEqual(self.echo.limiter.total, 0)

    def test_v2_ipv4_and_ipv6(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(v2("192.0.2.8", 1234)[:5])
        protocol.dataReceived(v2("192.0.2.8", 1234)[5:] + b"x\n")
        self.assertEqual(transport.value(), b"X\n")
        self.assertEqual(self.echo.limiter.per_peer, {"192.0.2.8": 1})
        protocol, transport = self.connect()
        protocol.dataReceived(v2("2001:db8::1", 1234) + b"y\n")
        self.assertEqual(transport.value(), b"Y\n")
        self.assertEqual(protocol.getPeer().port, 1234)
        self.assertIn("2001:db8::/64", self.echo.limiter.per_peer)

    def test_clients_behind_one_proxy_counted_apart(self) -> None:
        # max_connections_per_ip = 1: a second client of the same address
        # is refused, another address is served.
        first, _ = self.connect()
        first.dataReceived(V1)
        second, transport = self.connect()
        second.dataReceived(V1)
        self.assertEqual(
            transport.value(), b"ERR too many connections from your address\r\n"
        )
        third, transport = self.connect()
        third.dataReceived(V1.replace(b"192.0.2.7", b"192.0.2.9") + b"ok\n")
        self.assertEqual(transport.value(), b"OK\n")

    def test_access_list_sees_the_client(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(V1.replace(b"192.0.2.7", b"198.51.100.4") + b"hi\n")
        self.assertEqual(transport.value(), b"ERR access denied\r\n")
        self.assertEqual(self.echo.limiter.refused_by["acl"], 1)

    def test_local_command_is_the_proxy_itself(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(v2("0.0.0.0", 0, command=0x20) + b"hc\n")
        self.assertEqual(transport.value(), b"HC\n")
        self.assertEqual(protocol.wrappedProtocol._key, PROXY)

    def test_trusted_proxy_without_header_refused(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.0\r\n")
        self.assertEqual(
            transport.value(), b"ERR a trusted proxy sent no PROXY header\r\n"
        )
        self.assertFalse(transport.connected)
        self.assertIsNone(protocol.wrappedProtocol)
        self.assertEqual(self.echo.limiter.refused_by["proxy"], 1)
        self.assertIn(
            "echo: refused 10.0.0.5: a trusted proxy sent no PROXY header", self.logs()
        )

    def test_invalid_header_refused(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"PROXY TCP9 nonsense\r\n")
        self.assertEqual(transport.value(), b"ERR invalid PROXY header\r\n")
        self.assertEqual(self.echo.limiter.refused_by["proxy"], 1)

    def test_header_must_come_in_time(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"PROXY TCP4 ")
        self.clock.advance(self.echo.request_timeout)
        self.assertEqual(transport.value(), b"ERR no PROXY header in time\r\n")
        self.assertFalse(transport.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_header_from_elsewhere_refused(self) -> None:
        protocol, transport = self.connect("192.0.2.66")
        protocol.dataReceived(V1[:3])
        protocol.dataReceived(V1[3:])
        self.assertEqual(
            transport.value(),
            b"ERR PROXY header from an address not in trusted_proxies\r\n",
        )
        self.assertFalse(transport.connected)
        self.assertEqual(self.echo.limiter.refused_by["proxy"], 1)
        self.assertEqual(self.echo.limiter.total, 0)
        protocol, transport = self.connect("192.0.2.66")
        protocol.dataReceived(v2("192.0.2.7", 1))
        self.assertIn(b"not in trusted_proxies", transport.value())

    def test_direct_client_served_as_itself(self) -> None:
        protocol, transport = self.connect("192.0.2.66")
        # "P" could start a header: held until it cannot.
        protocol.dataReceived(b"P")
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"ing\n")
        self.assertEqual(transport.value(), b"PING\n")
        self.assertEqual(protocol.wrappedProtocol._key, "192.0.2.66")
        protocol.dataReceived(b"PROXY TCP4 later\n")
        self.assertEqual(transport.value(), b"PING\nPROXY TCP4 LATER\n")

    def test_half_close_reaches_the_service(self) -> None:
        protocol, transport = self.connect()
        self.assertTrue(IHalfCloseableProtocol.providedBy(protocol))
        protocol.dataReceived(V1 + b"last\n")
        protocol.readConnectionLost()
        self.assertEqual(transport.value(), b"LAST\n")
        self.assertFalse(transport.connected)

    def test_closed_before_the_header(self) -> None:
        protocol, transport = self.connect()
        transport.loseConnection()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.echo.limiter.total, 0)

    def test_unwrap_reaches_the_tcp_transport(self) -> None:
        protocol, transport = self.connect()
        self.assertIs(unwrap(protocol), transport)
        self.assertIs(unwrap(transport), transport)
        self.assertIsNot(type(transport), tcp.Server)
