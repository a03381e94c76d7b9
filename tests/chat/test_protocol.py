"""The chat datagram protocol on an in-memory transport, and its wiring."""

from __future__ import annotations

import errno
import re
import textwrap
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import MessageLengthError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

import sockd.chat.tap as chat_tap
from sockd import tap
from sockd.chat.protocol import ChatProtocol
from sockd.chat.state import AMPLIFICATION, ChatState
from tests.helpers import FakeDatagramTransport, settings, tempdir

A = ("127.0.0.1", 40001)
B = ("127.0.0.1", 40002)
TOKEN = re.compile(rb"/v ([a-z2-7]{8})\b")


class FailingTransport(FakeDatagramTransport):
    """Fails like sendto does, for some addresses only."""

    def __init__(self, failing: dict[Any, Exception]) -> None:
        super().__init__()
        self.failing = failing

    def write(self, data: bytes, addr: Any = None) -> None:
        if addr in self.failing:
            raise self.failing[addr]
        super().write(data, addr)


def make(
    transport: FakeDatagramTransport | None = None, **chat: str
) -> tuple[ChatProtocol, FakeDatagramTransport, Clock]:
    clock = Clock()
    clock.advance(1000)
    state = ChatState(settings(chat=chat).chat, clock, key=b"k" * 32)
    protocol = ChatProtocol(state)
    transport = transport or FakeDatagramTransport()
    protocol.makeConnection(transport)  # type: ignore[arg-type]
    return protocol, transport, clock


def to(transport: FakeDatagramTransport, addr: Any) -> list[bytes]:
    return [d for d, a in transport.written if a == addr]


def join(protocol: ChatProtocol, transport: FakeDatagramTransport, addr: Any) -> None:
    protocol.datagramReceived(b"hello there, anybody home?\n", addr)
    token = TOKEN.search(to(transport, addr)[-1])
    assert token is not None
    protocol.datagramReceived(b"/v " + token.group(1) + b"\n", addr)
    assert addr in protocol.state.members


class DatagramTests(SynchronousTestCase):
    def test_conversation(self) -> None:
        protocol, transport, _ = make()
        join(protocol, transport, A)
        join(protocol, transport, B)
        transport.written.clear()
        protocol.datagramReceived("caf\u00e9 \U0001f600\n".encode(), A)
        self.assertEqual(
            transport.written,
            [("<guest-1> caf\u00e9 \U0001f600\n".encode(), B)],
        )

    def test_oversized_gets_error_never_relayed(self) -> None:
        protocol, transport, _ = make(max_message="100")
        join(protocol, transport, A)
        join(protocol, transport, B)
        transport.written.clear()
        # the port reads one byte over max_message + CRLF: this is what a
        # too-large datagram looks like after truncation
        protocol.datagramReceived(b"x" * 103, A)
        protocol.datagramReceived(b"y" * 101 + b"\n", A)
        self.assertEqual(
            transport.written,
            [(b"*** error: message longer than 100 bytes\n", A)] * 2,
        )
        # exactly the limit, with CRLF, is fine
        protocol.datagramReceived(b"z" * 100 + b"\r\n", A)
        self.assertEqual(transport.written[-1], (b"<guest-1> " + b"z" * 100 + b"\n", B))
        self.assertEqual(protocol.state.dropped["oversized"], 2)

    def test_not_utf8_gets_error(self) -> None:
        protocol, transport, _ = make()
        join(protocol, transport, A)
        join(protocol, transport, B)
        transport.written.clear()
        for bad in (b"\xff\xfe\n", b"caf\xe9\n", b"\xed\xa0\x80\n", b"\xc2\n"):
            protocol.datagramReceived(bad, A)
        self.assertEqual(
            transport.written,
            [(b"*** error: message is not valid UTF-8\n", A)] * 4,
        )

    def test_escape_sequences_not_relayed_raw(self) -> None:
        protocol, transport, _ = make()
        join(protocol, transport, A)
        join(protocol, transport, B)
        transport.written.clear()
        protocol.datagramReceived(b"\x1b[2J\xc2\x9b31m\xe2\x80\xae\x07x\rhidden\n", A)
        ((data, addr),) = transport.written
        self.assertEqual(addr, B)
        self.assertIsNone(re.search(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]", data))
        self.assertNotIn("\u202e".encode(), data)
        self.assertIn(b"hidden", data)

    def test_send_errors_counted_others_served(self) -> None:
        C = ("127.0.0.1", 40003)
        transport = FailingTransport({})
        protocol, _, _ = make(transport)
        for addr in (A, B, C):
            join(protocol, transport, addr)
        transport.failing = {
            B: OSError(errno.ENOBUFS, "No buffer space available"),
            A: MessageLengthError("message too long"),
        }
        transport.written.clear()
        protocol.datagramReceived(b"to everyone\n", A)
        protocol.datagramReceived(b"/who\n", A)
        self.assertEqual(transport.written, [(b"<guest-1> to everyone\n", C)])
        self.assertEqual(protocol.send_errors, 2)
        protocol.datagramReceived(b"again\n", C)
        self.assertEqual(len(transport.written), 1)
        self.assertEqual(protocol.send_errors, 4)

    def test_socket_path_sends_direct_and_counts_errors(self) -> None:
        sent: list[tuple[bytes, Any]] = []

        class Socket:
            options: list[tuple[int, int, int]] = []

            def setsockopt(self, level: int, option: int, value: int) -> None:
                self.options.append((level, option, value))

            def sendto(self, data: bytes, addr: Any) -> int:
                if addr == B:
                    raise BlockingIOError(errno.EAGAIN, "try again")
                sent.append((data, addr))
                return len(data)

        transport = FakeDatagramTransport()
        transport.socket = Socket()  # type: ignore[attr-defined]
        protocol, _, _ = make(transport, validation="false")  # startProtocol
        self.assertEqual(len(Socket.options), 2)
        protocol.datagramReceived(b"/nick ann\n", A)
        protocol.datagramReceived(b"/nick bob\n", B)
        C = ("127.0.0.1", 40003)
        protocol.datagramReceived(b"/nick cy\n", C)
        protocol.datagramReceived(b"hi\n", A)
        protocol.datagramReceived(b"/who\n", B)
        self.assertEqual(transport.written, [])  # all through the socket
        self.assertIn((b"*** guest-2 is now known as bob\n", A), sent)
        self.assertIn((b"<ann> hi\n", C), sent)  # after bob's failed send
        self.assertFalse([d for d, a in sent if a == B])
        self.assertGreaterEqual(protocol.send_errors, 4)
        protocol.stopProtocol()
        protocol.datagramReceived(b"/ping\n", A)
        self.assertEqual(transport.written, [(b"*** pong\n", A)])

    def test_spoofed_flood_bytes_bounded(self) -> None:
        protocol, transport, clock = make(rate="100000", burst="100000")
        join(protocol, transport, A)
        join(protocol, transport, B)
        victim = ("127.0.0.2", 5555)
        received = 0
        sizes = [1, 3, 6, 10, 40, 200, 1500]
        for i in range(2000):
            data = b"/help " + b"x" * sizes[i % len(sizes)]
            received += len(data)
            protocol.datagramReceived(data, victim)
            if i % 100 == 0:
                clock.advance(0.1)
        sent = sum(len(d) for d, a in transport.written if a == victim)
        self.assertLessEqual(sent, AMPLIFICATION * received)
        self.assertTrue(all(d.startswith(b"*** ") for d in to(transport, victim)))
        # and the members are still served
        transport.written.clear()
        protocol.datagramReceived(b"still fine\n", A)
        self.assertEqual(transport.written, [(b"<guest-1> still fine\n", B)])


class UDPMemoryReactor(MemoryReactorClock):
    """Records UDP listens as well."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[tuple[int, Any, str, int]] = []

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> Any:
        self.udp.append((port, protocol, interface, maxPacketSize))
        test = self

        class Port:
            def getHost(self) -> IPv4Address:
                return IPv4Address("UDP", interface, port)

            def stopListening(self) -> None:
                test.udp.remove((port, protocol, interface, maxPacketSize))

        return Port()


class ServiceTests(SynchronousTestCase):
    def options(self, text: str, *args: str) -> chat_tap.Options:
        path = tempdir(self) / "sockd.ini"
        path.write_text(textwrap.dedent(text))
        options = chat_tap.Options()
        options.parseOptions(["--config", str(path), *args])
        return options

    def test_listeners_share_one_state(self) -> None:
        options = self.options(
            "[chat]\nenabled = false\nmax_message = 500\n",
            "--listen",
            "udp:8101:interface=127.0.0.1",
            "--listen",
            "udp:8102:interface=127.0.0.2",
            "--idle-timeout",
            "30",
        )
        config = options.config.chat
        self.assertTrue(config.enabled)
        self.assertEqual(config.idle_timeout, 30.0)
        reactor = UDPMemoryReactor()
        service = chat_tap.makeService(options, reactor=reactor)
        service.privilegedStartService()
        service.startService()
        (p1, one, i1, s1), (p2, two, i2, s2) = reactor.udp
        self.assertEqual(
            (p1, i1, s1, p2, i2), (8101, "127.0.0.1", 503, 8102, "127.0.0.2")
        )
        self.assertIsInstance(one, ChatProtocol)
        self.assertIsNot(one, two)
        self.assertIs(one.state, two.state)
        self.assertEqual(one.state.blocked_ports & {8101, 8102}, {8101, 8102})
        # the sweeper drops silent members on the reactor's clock
        state = one.state
        one.makeConnection(FakeDatagramTransport())
        state.validation = False
        one.datagramReceived(b"hi\n", A)
        self.assertIn(A, state.members)
        reactor.advance(34)
        self.assertNotIn(A, state.members)
        service.stopService()
        self.assertEqual(reactor.udp, [])

    def test_sighup_reload_applies_to_running_state(self) -> None:
        path = tempdir(self) / "sockd.ini"
        base = (
            "[echo]\nenabled = false\n[chat]\nlisten = udp:8104:interface=127.0.0.1\n"
        )
        path.write_text(base + "max_message = 200\nrate = 5\nhistory = 5\n")
        options = chat_tap.Options()
        options.parseOptions(["--config", str(path)])
        reactor = UDPMemoryReactor()
        service = chat_tap.makeService(options, reactor=reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        protocol = reactor.udp[0][1]
        protocol.makeConnection(FakeDatagramTransport())
        state = protocol.state
        state.validation = False
        protocol.datagramReceived(b"/nick ann\n", A)
        path.write_text(
            base + "max_message = 5000\nrate = 50\nhistory = 2\n"
            "default_room = hall\nvalidation = false\nnick_max_length = 3\n"
        )
        lifecycle = service.getServiceNamed("lifecycle")
        self.assertTrue(lifecycle.reload())  # type: ignore[attr-defined]
        self.assertEqual(state.rate, 50.0)
        self.assertEqual(state.max_message, 200)  # the port reads no more
        self.assertEqual(state.rooms["lobby"].history.maxlen, 2)
        self.assertEqual(state.members[A].nick, "ann")  # members stay
        protocol.datagramReceived(b"/nick anne\n", A)
        self.assertIn(b"1 to 3 letters", protocol.transport.written[-1][0])
        protocol.datagramReceived(b"hello\n", B)
        self.assertEqual(state.members[B].room.name, "hall")  # type: ignore[union-attr]

    def test_metrics_count_shared_state_once(self) -> None:
        options = self.options(
            "[chat]\nvalidation = false\n",
            "--listen",
            "udp:8105:interface=127.0.0.1",
            "--listen",
            "udp:8106:interface=127.0.0.1",
        )
        reactor = UDPMemoryReactor()
        service = chat_tap.makeService(options, reactor=reactor)
        service.privilegedStartService()
        one, two = reactor.udp[0][1], reactor.udp[1][1]
        one.makeConnection(FakeDatagramTransport())
        one.datagramReceived(b"hi\n", A)
        one.datagramReceived(b"\xff\n", A)
        samples = one.metrics() + two.metrics()
        members = [v for n, _, _, v in samples if n == "chat_members"]
        self.assertEqual(members, [1])
        invalid = [
            v
            for n, _, labels, v in samples
            if n == "datagrams_dropped_total" and labels.get("reason") == "invalid"
        ]
        self.assertEqual(invalid, [1])

    def test_bad_option_is_usage_error(self) -> None:
        with self.assertRaises((usage.UsageError, SystemExit)) as caught:
            self.options("", "--rate", "fast")
        self.assertIn("[chat] rate = 'fast'", str(caught.exception))

    def test_all_in_one_includes_chat(self) -> None:
        path = tempdir(self) / "sockd.ini"
        path.write_text(
            "[echo]\nenabled = false\n[chat]\nenabled = true\n"
            "listen = udp:8103:interface=127.0.0.1\n"
        )
        options = tap.Options()
        options.parseOptions(["--config", str(path)])
        reactor = UDPMemoryReactor()
        tap.makeService(options, reactor=reactor).privilegedStartService()
        self.assertEqual([u[0] for u in reactor.udp], [8103])


class AccessTests(SynchronousTestCase):
    def test_denied_source_gets_nothing_and_leaves_no_state(self) -> None:
        from sockd.core.config import networks
        from sockd.core.limits import AccessList

        protocol, transport, _ = make()
        deny = networks("127.0.0.3/32", tempdir(self))
        protocol.set_access(AccessList(deny=deny), AccessList())
        protocol.datagramReceived(b"hello there, anybody home?\n", ("127.0.0.3", 5000))
        protocol.datagramReceived(b"\xff not utf-8\n", ("127.0.0.3", 5000))
        self.assertEqual(transport.written, [])
        self.assertEqual(protocol.state.members, {})
        self.assertEqual(protocol.acl_dropped, 2)
        self.assertIn(
            (
                "datagrams_dropped_total",
                "counter",
                {"service": "chat", "reason": "acl"},
                2,
            ),
            protocol.metrics(),
        )
        protocol.datagramReceived(b"hello there, anybody home?\n", ("127.0.0.2", 5000))
        self.assertNotEqual(to(transport, ("127.0.0.2", 5000)), [])
