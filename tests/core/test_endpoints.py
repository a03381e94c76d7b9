"""Tests of sockd.core.endpoints: endpoint strings and adoption."""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet import endpoints
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    _SystemdParser,
)
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.testing import MemoryReactor
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase

from sockd.core.endpoints import (
    check_stream,
    check_systemd_index,
    inherited_fds,
    inherited_sockets,
    parse_datagram,
    stream_endpoint,
    use_inherited_sockets,
)
from tests.helpers import Daemon, free_port_pair, socket_activation, tempdir


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


class CheckStreamTests(SynchronousTestCase):
    """What Twisted's stream parser lets through to bind time."""

    def test_accepted(self) -> None:
        for good in [
            "tcp:0",
            "tcp:65535:interface=127.0.0.1:backlog=65535",
            r"tcp:9000:interface=\:\:1",  # Twisted binds IPv6 for it
            r"tcp6:9000:interface=fe80\:\:1%lo",
            "tcp:9000:127.0.0.1:5",  # positional interface and backlog
            "tcp6:9000:5",  # tcp6's second field is the backlog
        ]:
            check_stream(good)

    def test_refused(self) -> None:
        for bad, fragment in [
            ("tcp:65536", "port '65536' is not a number from 0 to 65535"),
            ("tcp:80x", "port '80x'"),
            ("tcp6:9000:5:127.0.0.1", "not an IPv6 address"),
            ("tcp:9000:localhost", "interface 'localhost' is not an IP address"),
            ("tcp6:9000:x", "backlog 'x'"),
            ("tcp:1:2:3:4", "too many ':'-separated fields"),
            ("tcp:1:127.0.0.1:interface=127.0.0.2", "too many"),
            ("unix:", "expected unix:PATH"),
            ("tcp:1:backlog=1:backlog=2", "given twice"),
            # No socket passed (LISTEN_FDS) to this process.
            ("systemd:domain=INET:index=0", "no socket was passed"),
            ("systemd:INET:3", "index 3 was asked for"),
        ]:
            with self.assertRaises(ValueError, msg=bad) as caught:
                check_stream(bad)
            self.assertIn(fragment, str(caught.exception), bad)

    def test_ssl_files_must_be_regular_files(self) -> None:
        directory = tempdir(self)
        os.mkfifo(directory / "dh.pem")
        key = directory / "key.pem"
        key.write_text("")
        check_stream(f"ssl:1:privateKey={key}")
        for bad, fragment in [
            (f"ssl:1:privateKey={directory}", "is a directory, not a regular file"),
            (f"ssl:1:privateKey={key}:certKey={directory}/none", "certKey="),
            (f"ssl:1:privateKey={key}:dhParameters={directory}/dh.pem", "a FIFO"),
        ]:
            with self.assertRaises(ValueError, msg=bad) as caught:
                check_stream(bad)
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
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([3, 4], ("a", "b")))
        e = parse_datagram("systemd:domain=INET:index=5")
        with self.assertRaises(ValueError) as caught:
            e.listen(MemoryReactor(), DatagramProtocol(), 100)
        self.assertEqual(
            str(caught.exception),
            "systemd:domain=INET:index=5: index 5 was asked for, but systemd "
            "passed 2 socket(s), indexes 0 to 1 (the .socket unit's Listen...= "
            "lines, in order)",
        )


class SystemdIndexTests(SynchronousTestCase):
    """A missing systemd socket says what was asked for and what came."""

    def refused(self, index: int, started_with: dict[str, str]) -> str:
        with self.assertRaises(ValueError) as caught:
            check_systemd_index(index, started_with)
        return str(caught.exception)

    def test_index_within_the_sockets_passed(self) -> None:
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([3, 4], ("a", "b")))
        check_systemd_index(1, {})
        self.assertIn(
            "index 2 was asked for, but systemd passed 2 socket(s), indexes 0 to 1",
            self.refused(2, {}),
        )

    def test_nothing_passed(self) -> None:
        message = self.refused(0, {})
        self.assertIn("index 0 was asked for, but no socket was passed", message)
        self.assertIn("start the daemon through its .socket unit", message)
        # LISTEN_PID names another process: not passed to this one.
        other = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
        self.assertIn("no socket was passed", self.refused(0, other))

    def test_names_missing(self) -> None:
        # systemd-socket-activate without --fdname: Twisted ignores them.
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
        self.assertEqual(
            self.refused(1, env),
            "index 1 was asked for; 2 socket(s) were passed (LISTEN_FDS=2), but "
            "none can be used: LISTEN_FDNAMES is missing, and Twisted ignores "
            "sockets without names (systemd always names them; "
            "systemd-socket-activate needs --fdname=NAME)",
        )

    def test_names_miscounted(self) -> None:
        env = {
            "LISTEN_PID": str(os.getpid()),
            "LISTEN_FDS": "2",
            "LISTEN_FDNAMES": "a:b:c",
        }
        self.assertIn(
            "LISTEN_FDNAMES names 3 socket(s), and Twisted ignores the sockets "
            "when the counts differ",
            self.refused(0, env),
        )

    def test_checked_at_config_time_for_both_kinds(self) -> None:
        from sockd.core.config import ConfigError, parse

        self.patch(_SystemdParser, "_sddaemon", ListenFDs([3], ("a",)))
        for key in ("listen", "listen_udp"):
            with self.assertRaises(ConfigError) as caught:
                parse(f"[echo]\n{key} = systemd:domain=INET:index=1\n")
            self.assertIn(
                f"[echo] {key} = 'systemd:domain=INET:index=1'", str(caught.exception)
            )
            self.assertIn(
                "index 1 was asked for, but systemd passed 1 socket(s)",
                str(caught.exception),
            )


@pytest.mark.integration
def test_real_activation_without_names_says_so() -> None:
    """C{systemd-socket-activate} without C{--fdname}, as users try it."""
    port = free_port_pair()
    address = f"127.0.0.1:{port}"
    wrapper = socket_activation([("stream", address), ("datagram", address)], "x")
    wrapper = [word for word in wrapper if not word.startswith("--fdname")]
    ini = "[echo]\nlisten = systemd:domain=INET:index=0\n"
    daemon = Daemon("sockd-echo", ini, wrapper=wrapper)
    try:
        daemon.launch()
        daemon.wait_for(f"Listening on {address} as 3")
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            line = daemon.wait_for("was asked for", 20)
        assert line.endswith(
            "[echo] listen = 'systemd:domain=INET:index=0': "
            "'systemd:domain=INET:index=0' is not a valid endpoint: index 0 was "
            "asked for; 2 socket(s) were passed (LISTEN_FDS=2), but none can be "
            "used: LISTEN_FDNAMES is missing, and Twisted ignores sockets without "
            "names (systemd always names them; systemd-socket-activate needs "
            "--fdname=NAME)"
        ), line
        assert daemon.process is not None
        assert daemon.process.wait(20) == 1
    finally:
        daemon.stop()


class StreamEndpointTests(SynchronousTestCase):
    def inherit(self, record: ListenFDs | None) -> None:
        use_inherited_sockets(record)
        self.addCleanup(use_inherited_sockets, None)

    def test_systemd_by_index_and_name(self) -> None:
        self.inherit(ListenFDs([3, 4, 5], ("web", "web", "admin")))
        reactor = MemoryReactor()
        for description, fd, family in [
            ("systemd:domain=INET:index=0", 3, socket.AF_INET),
            ("systemd:INET6:2", 5, socket.AF_INET6),
            ("SYSTEMD:domain=unix:name=admin", 5, socket.AF_UNIX),
        ]:
            parsed = stream_endpoint(reactor, description)
            endpoint = parsed.endpoint
            assert isinstance(endpoint, AdoptedStreamServerEndpoint), description
            self.assertEqual((endpoint.fileno, endpoint.addressFamily), (fd, family))
            self.assertIs(endpoint.reactor, reactor)
            self.assertIsNone(parsed.tls)

    def test_systemd_refused(self) -> None:
        self.inherit(ListenFDs([3], ("web",)))
        for bad, fragment in [
            (
                "systemd:domain=INET:index=1",
                "index 1 was asked for, but systemd passed 1 socket(s), indexes 0 to 0",
            ),
            ("systemd:domain=INET:index=-1", "index '-1' is not a number"),
            ("systemd:domain=INET:name=admin", "no socket named 'admin' (names: web)"),
            ("systemd:domain=INET", "exactly one of index= and name="),
            ("systemd:domain=INET:index=0:name=web", "exactly one of"),
            ("systemd:domain=IPX:index=0", "domain 'IPX' is not one of INET,"),
            ("systemd:index=0", "domain '' is not one of"),
            ("systemd:domain=INET:index=0:port=80", "unknown option(s) port"),
            ("systemd:INET:0:web:x", "expected systemd:domain=INET:index=N"),
        ]:
            with self.assertRaises(ValueError, msg=bad) as caught:
                stream_endpoint(MemoryReactor(), bad)
            self.assertIn(fragment, str(caught.exception), bad)

    def test_worker_placeholders_stand_for_the_main_process_sockets(self) -> None:
        # What a worker is given: the count and names, not the descriptors.
        self.inherit(ListenFDs([-1, -1], ("web", "admin")))
        self.assertEqual(inherited_fds(), [-1, -1])
        endpoint = stream_endpoint(MemoryReactor(), "systemd:INET:name=admin").endpoint
        assert isinstance(endpoint, AdoptedStreamServerEndpoint)
        self.assertEqual(endpoint.fileno, -1)
        check_stream("systemd:domain=INET:index=1")

    def test_twisteds_record_by_default(self) -> None:
        record = ListenFDs([3, 4], ("a", "b"))
        self.patch(endpoints._SystemdParser, "_sddaemon", record)
        self.assertIs(inherited_sockets(), record)
        self.assertEqual(inherited_fds(), [3, 4])
        endpoint = stream_endpoint(MemoryReactor(), "systemd:INET:name=b").endpoint
        assert isinstance(endpoint, AdoptedStreamServerEndpoint)
        self.assertEqual(endpoint.fileno, 4)

    def test_tcp_is_twisteds(self) -> None:
        parsed = stream_endpoint(MemoryReactor(), "tcp:0:interface=127.0.0.1")
        self.assertIsInstance(parsed.endpoint, TCP4ServerEndpoint)
        self.assertIsNone(parsed.tls)

    def test_ssl_keeps_its_tls_settings(self) -> None:
        from sockd.client import cert as certificates

        directory = tempdir(self)
        pem, private = certificates.make_certificate("localhost")
        (directory / "cert.pem").write_bytes(pem)
        (directory / "key.pem").write_bytes(private)
        reactor = MemoryReactor()
        parsed = stream_endpoint(
            reactor,
            f"ssl:9443:privateKey={directory}/key.pem:certKey={directory}/cert.pem"
            ":interface=127.0.0.1:backlog=7",
        )
        self.assertIsInstance(parsed.endpoint, SSL4ServerEndpoint)
        self.assertIsNotNone(parsed.tls)
        factory = Factory()
        parsed.endpoint.listen(factory)
        # It listens as Twisted's own would, with those very settings.
        self.assertEqual(
            reactor.sslServers, [(9443, factory, parsed.tls, 7, "127.0.0.1")]
        )

    def test_ssl_errors_are_twisteds(self) -> None:
        directory = tempdir(self)
        with self.assertRaises(FileNotFoundError):
            stream_endpoint(MemoryReactor(), f"ssl:1:privateKey={directory}/none")
