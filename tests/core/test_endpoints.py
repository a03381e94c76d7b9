"""Tests of sockd.core.endpoints: datagram endpoint strings and adoption."""

from __future__ import annotations

import os
import socket

from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from sockd.core.endpoints import inherited_fds, parse_datagram


class ParseTests(SynchronousTestCase):
    def test_udp(self) -> None:
        e = parse_datagram("udp:9001:interface=127.0.0.1")
        self.assertEqual(
            (e.port, e.interface, e.family), (9001, "127.0.0.1", socket.AF_INET)
        )

    def test_udp_ipv6_escaped(self) -> None:
        e = parse_datagram(r"udp:9001:interface=\:\:1")
        self.assertEqual((e.interface, e.family), ("::1", socket.AF_INET6))

    def test_packet_size(self) -> None:
        self.assertEqual(
            parse_datagram("udp:1:maxPacketSize=1500").max_packet_size, 1500
        )

    def test_systemd(self) -> None:
        e = parse_datagram("systemd:domain=INET6:index=2")
        self.assertEqual((e.systemd_index, e.family), (2, socket.AF_INET6))

    def test_errors(self) -> None:
        for bad, fragment in [
            ("udp", "expected udp:PORT"),
            ("udp:x", "not a number"),
            ("udp:70000", "0 to 65535"),
            ("udp:1:colour=red", "unknown option"),
            ("udp:1:interface=localhost", "not an IP"),
            ("udp:1:maxPacketSize=0", "maxPacketSize"),
            ("systemd:domain=UNIX:index=0", "expected"),
            ("systemd:domain=INET", "index must be a number"),
            ("tcp:80", "not a datagram endpoint"),
            ("udp:1:interface=a:interface=b", "given twice"),
        ]:
            with self.assertRaises(ValueError, msg=bad) as caught:
                parse_datagram(bad)
            self.assertIn(fragment, str(caught.exception), bad)


class ListenTests(SynchronousTestCase):
    def test_listen_udp(self) -> None:
        calls: list[tuple[object, ...]] = []

        class Reactor:
            def listenUDP(self, *args: object, **kwargs: object) -> str:
                calls.append((*args, kwargs))
                return "port"

        proto = DatagramProtocol()
        port = parse_datagram("udp:0:interface=127.0.0.1").listen(
            Reactor(), proto, 1001
        )
        self.assertEqual(port, "port")
        self.assertEqual(
            calls, [(0, proto, {"interface": "127.0.0.1", "maxPacketSize": 1001})]
        )

    def test_inherited_fds_need_our_pid(self) -> None:
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.assertEqual(inherited_fds(), [3, 4])
            os.environ["LISTEN_PID"] = "1"
            self.assertEqual(inherited_fds(), [])
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def test_systemd_index_out_of_range(self) -> None:
        e = parse_datagram("systemd:domain=INET:index=5")
        with self.assertRaises(ValueError) as caught:
            e.listen(MemoryReactor(), DatagramProtocol(), 100)
        self.assertIn("there is no index 5", str(caught.exception))
