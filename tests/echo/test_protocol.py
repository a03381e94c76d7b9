"""In-memory tests of the echo protocols (sockd.echo.protocol)."""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sockd.core.config import Config, EchoSettings
from sockd.echo.protocol import (
    DatagramEcho,
    EchoFactory,
    LineEcho,
    RawEcho,
    TelnetFilter,
    upper_line,
    upper_within,
)
from tests.helpers import ROOT, FakeDatagramTransport, connect


def factory(clock: Clock | None = None, **changes: object) -> EchoFactory:
    return EchoFactory(replace(EchoSettings(), **changes), clock or Clock(), 2.0)


class TransformTests(SynchronousTestCase):
    def test_ascii(self) -> None:
        self.assertEqual(upper_line(b"hello, world 1"), b"HELLO, WORLD 1")

    def test_unicode_aware_for_valid_utf8(self) -> None:
        self.assertEqual(upper_line("ça va, été".encode()), "ÇA VA, ÉTÉ".encode())

    def test_bytewise_for_invalid_utf8(self) -> None:
        self.assertEqual(upper_line(b"caf\xe9 ok"), b"CAF\xe9 OK")

    def test_upper_may_grow(self) -> None:
        # U+0390 upper-cases to three code points.
        self.assertGreater(len(upper_line("\u0390".encode())), 2)

    def test_upper_within_never_grows(self) -> None:
        data = "a\u0390é".encode()
        result = upper_within(data)
        self.assertLessEqual(len(result), len(data))
        self.assertEqual(result, "A\u0390É".encode())

    @given(st.binary(max_size=200))
    @settings(max_examples=200, deadline=None)
    def test_upper_within_bound_on_any_bytes(self, data: bytes) -> None:
        self.assertLessEqual(len(upper_within(data)), len(data))


class LineEchoTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = factory(self.clock)
        self.proto, self.transport = connect(self.factory)

    def test_protocol_by_mode(self) -> None:
        self.assertIsInstance(self.proto, LineEcho)
        raw, _ = connect(factory(mode="raw"))
        self.assertIsInstance(raw, RawEcho)

    def test_lf_line(self) -> None:
        self.proto.dataReceived(b"hello\n")
        self.assertEqual(self.transport.value(), b"HELLO\n")

    def test_answered_connection_holds_no_attribute_dict(self) -> None:
        # Its state is in slots: an idle connection carries no dict.
        self.proto.dataReceived(b"hello\n")
        self.assertEqual(vars(self.proto), {})

    def test_crlf_line_keeps_crlf(self) -> None:
        self.proto.dataReceived(b"hello\r\nworld\n")
        self.assertEqual(self.transport.value(), b"HELLO\r\nWORLD\n")

    def test_partial_line_waits(self) -> None:
        self.proto.dataReceived(b"hel")
        self.assertEqual(self.transport.value(), b"")
        self.proto.dataReceived(b"lo\r")
        self.assertEqual(self.transport.value(), b"")
        self.proto.dataReceived(b"\nx")
        self.assertEqual(self.transport.value(), b"HELLO\r\n")

    def test_every_split_point(self) -> None:
        data = "one\r\nçà\ntwo three\r\n\nlast\n".encode()
        expected = "ONE\r\nÇÀ\nTWO THREE\r\n\nLAST\n".encode()
        for cut in range(len(data) + 1):
            proto, transport = connect(factory())
            proto.dataReceived(data[:cut])
            proto.dataReceived(data[cut:])
            self.assertEqual(transport.value(), expected, f"cut at {cut}")

    def test_utf8_split_inside_character(self) -> None:
        data = "é\n".encode()
        self.proto.dataReceived(data[:1])
        self.proto.dataReceived(data[1:])
        self.assertEqual(self.transport.value(), "É\n".encode())

    def test_invalid_line_does_not_spoil_others(self) -> None:
        self.proto.dataReceived("é\n".encode() + b"\xe9t\xe9\n")
        self.assertEqual(self.transport.value(), "É\n".encode() + b"\xe9T\xe9\n")

    def test_transform_none(self) -> None:
        proto, transport = connect(factory(transform="none"))
        proto.dataReceived(b"Hello\r\n")
        self.assertEqual(transport.value(), b"Hello\r\n")

    def test_empty_lines(self) -> None:
        self.proto.dataReceived(b"\n\r\n")
        self.assertEqual(self.transport.value(), b"\n\r\n")

    def test_one_write_per_read(self) -> None:
        writes: list[bytes] = []
        self.transport.write = writes.append  # type: ignore[method-assign]
        self.proto.dataReceived(b"a\nb\nc\n")
        self.assertEqual(writes, [b"A\nB\nC\n"])

    def test_line_at_limit_is_answered(self) -> None:
        proto, transport = connect(factory(max_line_length=8))
        proto.dataReceived(b"12345678\r\n")
        self.assertEqual(transport.value(), b"12345678\r\n")
        self.assertTrue(transport.connected)

    def test_overlong_complete_line(self) -> None:
        proto, transport = connect(factory(max_line_length=8))
        proto.dataReceived(b"ok\n123456789\nnever\n")
        self.assertEqual(
            transport.value(), b"OK\nERR line longer than 8 bytes; closing\r\n"
        )
        self.assertFalse(transport.connected)

    def test_overlong_partial_line(self) -> None:
        proto, transport = connect(factory(max_line_length=8))
        proto.dataReceived(b"12345")
        proto.dataReceived(b"6789")
        self.assertEqual(
            transport.value(), b"ERR line longer than 8 bytes; closing\r\n"
        )
        self.assertFalse(transport.connected)
        proto.dataReceived(b"more\n")
        self.assertNotIn(b"MORE", transport.value())

    def test_overlong_then_memory_flat(self) -> None:
        proto, transport = connect(factory(max_line_length=1024))
        for _ in range(100):
            proto.dataReceived(b"x" * 1000)
        self.assertEqual(proto._buffer, b"")

    def test_half_close_answers_everything(self) -> None:
        self.proto.dataReceived(b"one\ntwo")
        self.proto.readConnectionLost()
        self.assertEqual(self.transport.value(), b"ONE\nTWO")
        self.assertFalse(self.transport.connected)

    def test_backpressure_registered(self) -> None:
        self.assertIs(self.transport.producer, self.transport)
        self.assertTrue(self.transport.streaming)


class TelnetTests(SynchronousTestCase):
    def test_negotiation_refused_and_not_echoed(self) -> None:
        proto, transport = connect(factory())
        # DO ECHO, WILL SUPPRESS-GO-AHEAD, then a line
        proto.dataReceived(b"\xff\xfd\x01\xff\xfb\x03hi\r\n")
        self.assertEqual(transport.value(), b"\xff\xfc\x01\xff\xfe\x03HI\r\n")

    def test_interrupt_and_timing_mark(self) -> None:
        # What telnet sends on ^C: IAC IP, IAC DO TIMING-MARK.
        proto, transport = connect(factory())
        proto.dataReceived(b"ab\xff\xf4\xff\xfd\x06cd\n")
        self.assertEqual(transport.value(), b"\xff\xfc\x06ABCD\n")

    def test_split_command(self) -> None:
        filt = TelnetFilter()
        out1, rep1 = filt.feed(b"x\xff")
        out2, rep2 = filt.feed(b"\xfd")
        out3, rep3 = filt.feed(b"\x18y")
        self.assertEqual(out1 + out2 + out3, b"xy")
        self.assertEqual(rep1 + rep2 + rep3, b"\xff\xfc\x18")

    def test_subnegotiation_removed(self) -> None:
        filt = TelnetFilter()
        out1, _ = filt.feed(b"a\xff\xfa\x18\x00xter")
        out2, _ = filt.feed(b"m\xff")
        out3, _ = filt.feed(b"\xf0b")
        self.assertEqual(out1 + out2 + out3, b"ab")

    def test_escaped_iac_is_data(self) -> None:
        self.assertEqual(TelnetFilter().feed(b"a\xff\xffb"), (b"a\xffb", b""))

    def test_stray_ff_kept(self) -> None:
        self.assertEqual(TelnetFilter().feed(b"a\xff\x41"), (b"a\xffA", b""))

    @given(st.lists(st.binary(max_size=20), max_size=10))
    @settings(max_examples=300, deadline=None)
    def test_chunking_does_not_matter(self, chunks: list[bytes]) -> None:
        whole = TelnetFilter().feed(b"".join(chunks))
        filt = TelnetFilter()
        parts = [filt.feed(c) for c in chunks]
        self.assertEqual(b"".join(p[0] for p in parts), whole[0])
        self.assertEqual(b"".join(p[1] for p in parts), whole[1])


class LineEchoFuzzTests(SynchronousTestCase):
    @given(
        st.lists(
            st.text(
                alphabet=st.characters(
                    blacklist_characters="\r\n\xff", blacklist_categories=("Cs",)
                ),
                max_size=30,
            ),
            max_size=20,
        ),
        st.lists(st.integers(min_value=0, max_value=400), max_size=10),
        st.booleans(),
    )
    @settings(max_examples=200, deadline=None)
    def test_every_line_answered_in_order(
        self, lines: list[str], cuts: list[int], crlf: bool
    ) -> None:
        end = "\r\n" if crlf else "\n"
        data = "".join(line + end for line in lines).encode()
        expected = b"".join(upper_line(line.encode()) + end.encode() for line in lines)
        proto, transport = connect(factory(max_line_length=1000))
        start = 0
        for cut in sorted(c for c in cuts if c <= len(data)):
            proto.dataReceived(data[start:cut])
            start = cut
        proto.dataReceived(data[start:])
        self.assertEqual(transport.value(), expected)

    @given(st.lists(st.binary(max_size=50), max_size=20))
    @settings(max_examples=200, deadline=None)
    def test_arbitrary_bytes_never_crash(self, chunks: list[bytes]) -> None:
        proto, transport = connect(factory(max_line_length=64))
        for chunk in chunks:
            proto.dataReceived(chunk)
        proto.readConnectionLost()
        self.assertFalse(transport.connected)


class RawEchoTests(SynchronousTestCase):
    def test_chunk_answered_without_newline(self) -> None:
        proto, transport = connect(factory(mode="raw"))
        proto.dataReceived(b"hello")
        self.assertEqual(transport.value(), b"HELLO")

    def test_bytewise(self) -> None:
        proto, transport = connect(factory(mode="raw"))
        data = "é\xff".encode() + b"\xff\xfd\x01"
        proto.dataReceived(data)
        self.assertEqual(transport.value(), data.upper())
        self.assertEqual(len(transport.value()), len(data))

    def test_half_close(self) -> None:
        proto, transport = connect(factory(mode="raw"))
        proto.dataReceived(b"abc")
        proto.readConnectionLost()
        self.assertEqual(transport.value(), b"ABC")
        self.assertFalse(transport.connected)


class ByteCountTests(SynchronousTestCase):
    """The connection's end line counts every byte read and written."""

    def counted(self, chunks: list[bytes], **changes: object) -> tuple[int, int]:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        proto, transport = connect(factory(**changes))
        for chunk in chunks:
            proto.dataReceived(chunk)
        proto.readConnectionLost()  # half-close: the last line is answered
        (line,) = [e for e in events if e.get("event") == "connection"]
        # Everything written to the transport, and only that, is counted out.
        self.assertEqual(line["bytes_out"], len(transport.value()))
        return line["bytes_in"], line["bytes_out"]

    def test_lines_that_grow_and_a_last_line_without_newline(self) -> None:
        # U+0149 (2 bytes) upper-cases to U+02BC N (3 bytes).
        data = ["\u0149\r\n".encode(), b"x\n", b"la", b"st"]
        self.assertEqual(self.counted(data), (10, 11))

    def test_telnet_refusals_count_as_written(self) -> None:
        self.assertEqual(self.counted([b"\xff\xfd\x01hi\n"]), (6, 6))

    def test_overlong_line_and_its_error(self) -> None:
        data = [b"ok\n123456789\n"]
        sent = len(b"OK\nERR line longer than 8 bytes; closing\r\n")
        self.assertEqual(self.counted(data, max_line_length=8), (13, sent))

    def test_raw(self) -> None:
        self.assertEqual(self.counted([b"abc", b"\xff\x00d"], mode="raw"), (6, 6))


class TimeoutTests(SynchronousTestCase):
    def test_idle_timeout_closes(self) -> None:
        clock = Clock()
        proto, transport = connect(factory(clock, idle_timeout=10))
        clock.advance(9)
        proto.dataReceived(b"a\n")
        clock.advance(9)
        self.assertTrue(transport.connected)
        clock.advance(1.5)
        self.assertFalse(transport.connected)

    def test_slowloris_absolute_deadline(self) -> None:
        # One byte every half second keeps the idle timer happy but the
        # line must still be complete within line_timeout.
        clock = Clock()
        proto, transport = connect(
            factory(clock, idle_timeout=100, line_timeout=5, max_line_length=1000)
        )
        for _ in range(9):
            proto.dataReceived(b"x")
            clock.advance(0.5)
        self.assertTrue(transport.connected)
        for _ in range(3):
            proto.dataReceived(b"x")
            clock.advance(0.5)
        self.assertFalse(transport.connected)

    def test_deadline_per_line(self) -> None:
        clock = Clock()
        proto, transport = connect(factory(clock, idle_timeout=100, line_timeout=5))
        for _ in range(10):
            proto.dataReceived(b"abc")
            clock.advance(4)
            proto.dataReceived(b"\n")
        self.assertTrue(transport.connected)
        self.assertEqual(transport.value(), b"ABC\n" * 10)

    def test_close_aborts_after_grace(self) -> None:
        # A peer that does not read: loseConnection alone never completes.
        clock = Clock()
        f = factory(clock, idle_timeout=10)
        proto, transport = connect(f)
        transport.loseConnection = lambda: None  # type: ignore[method-assign]
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        clock.advance(10)
        self.assertEqual(aborted, [])
        self.assertIsNone(transport.producer)
        clock.advance(2)
        self.assertEqual(aborted, [True])

    def test_timers_cancelled_on_close(self) -> None:
        clock = Clock()
        proto, transport = connect(factory(clock))
        proto.dataReceived(b"partial")
        self.assertTrue(clock.getDelayedCalls())
        transport.loseConnection()
        self.assertEqual(clock.getDelayedCalls(), [])


class ConnectionCapTests(SynchronousTestCase):
    def test_per_ip_cap_and_other_source(self) -> None:
        f = factory(max_connections=10, max_connections_per_ip=2)
        first = [connect(f, "127.0.0.1") for _ in range(2)]
        proto, transport = connect(f, "127.0.0.1")
        self.assertEqual(
            transport.value(), b"ERR too many connections from your address\r\n"
        )
        self.assertFalse(transport.connected)
        other, other_transport = connect(f, "127.0.0.2")
        other.dataReceived(b"hi\n")
        self.assertEqual(other_transport.value(), b"HI\n")
        # A slot frees when a connection closes.
        first[0][1].loseConnection()
        again, again_transport = connect(f, "127.0.0.1")
        again.dataReceived(b"x\n")
        self.assertEqual(again_transport.value(), b"X\n")

    def test_mapped_ipv6_counts_as_ipv4(self) -> None:
        f = factory(max_connections=10, max_connections_per_ip=1)
        connect(f, "10.1.2.3")
        _, transport = connect(f, "::ffff:10.1.2.3")
        self.assertIn(b"too many connections", transport.value())

    def test_total_cap(self) -> None:
        f = factory(max_connections=2, max_connections_per_ip=2)
        connect(f, "127.0.0.1")
        connect(f, "127.0.0.2")
        _, transport = connect(f, "127.0.0.3")
        self.assertEqual(
            transport.value(), b"ERR too many connections to this server\r\n"
        )

    def test_release_is_exact(self) -> None:
        f = factory()
        conns = [connect(f, f"127.0.0.{i % 5 + 1}") for i in range(20)]
        self.assertEqual(f.limiter.total, 20)
        for _, transport in conns:
            transport.loseConnection()
        self.assertEqual(f.limiter.total, 0)
        self.assertEqual(f.limiter.per_peer, {})


class DatagramEchoTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = DatagramEcho(
            replace(EchoSettings(), udp_rate=10, udp_burst=5, udp_max_datagram=100),
            self.clock,
            own_ports=[9001],
        )
        self.transport = FakeDatagramTransport()
        self.proto.makeConnection(self.transport)  # type: ignore[arg-type]

    def test_echo(self) -> None:
        self.proto.datagramReceived("hé\n".encode(), ("127.0.0.1", 5000))
        self.assertEqual(
            self.transport.written, [("HÉ\n".encode(), ("127.0.0.1", 5000))]
        )

    def test_reply_never_larger(self) -> None:
        data = "\u0390" * 10
        self.proto.datagramReceived(data.encode(), ("127.0.0.1", 5000))
        reply = self.transport.written[0][0]
        self.assertLessEqual(len(reply), len(data.encode()))

    def test_loop_ports_dropped(self) -> None:
        for port in (0, 7, 9, 13, 17, 19, 37, 53, 123, 9001):
            self.proto.datagramReceived(b"x", ("127.0.0.1", port))
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.proto.dropped["loop"], 10)

    def test_reflectors_dropped(self) -> None:
        # SSDP, mDNS, memcached, chat's default port: each answers a
        # forged datagram, starting a loop or amplifying toward a victim.
        for port in (1900, 5353, 11211, 8001, 3702, 5683, 10001, 27015):
            self.proto.datagramReceived(b"x", ("127.0.0.1", port))
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.proto.dropped["loop"], 8)

    def test_privileged_ports_dropped_unless_allowed(self) -> None:
        for port in (1, 443, 500, 1023):
            self.proto.datagramReceived(b"x", ("127.0.0.1", port))
        self.assertEqual(self.transport.written, [])
        self.proto.datagramReceived(b"x", ("127.0.0.1", 1024))
        self.assertEqual(self.transport.written, [(b"X", ("127.0.0.1", 1024))])
        allowed = replace(EchoSettings(), udp_allow_privileged_ports=True)
        self.proto.reconfigure(Config(echo=allowed))
        self.proto.datagramReceived(b"y", ("127.0.0.1", 500))
        self.proto.datagramReceived(b"z", ("127.0.0.1", 53))  # still in the table
        self.proto.datagramReceived(b"w", ("127.0.0.1", 9001))  # still our own
        self.assertEqual(self.transport.written[1:], [(b"Y", ("127.0.0.1", 500))])

    def test_oversized_dropped_not_truncated(self) -> None:
        self.proto.datagramReceived(b"x" * 100, ("127.0.0.1", 5000))
        self.proto.datagramReceived(b"x" * 101, ("127.0.0.1", 5000))
        self.assertEqual(self.transport.written, [(b"X" * 100, ("127.0.0.1", 5000))])
        self.assertEqual(self.proto.dropped["oversized"], 1)

    def test_rate_limit_per_source(self) -> None:
        for _ in range(20):
            self.proto.datagramReceived(b"a", ("127.0.0.2", 5000))
        self.assertEqual(len(self.transport.written), 5)
        # Another source is still answered.
        self.proto.datagramReceived(b"b", ("127.0.0.3", 5000))
        self.assertEqual(self.transport.written[-1], (b"B", ("127.0.0.3", 5000)))
        # Tokens come back with time.
        self.clock.advance(1)
        for _ in range(20):
            self.proto.datagramReceived(b"a", ("127.0.0.2", 5000))
        self.assertEqual(len(self.transport.written), 6 + 5)

    def test_global_cap(self) -> None:
        proto = DatagramEcho(
            replace(EchoSettings(), udp_rate=100, udp_burst=100, udp_total_rate=10),
            self.clock,
        )
        transport = FakeDatagramTransport()
        proto.makeConnection(transport)  # type: ignore[arg-type]
        for i in range(200):
            proto.datagramReceived(b"a", (f"127.0.{i}.1", 5000))
        self.assertLessEqual(len(transport.written), 100)

    def test_loop_with_an_echo_on_another_port_is_cut(self) -> None:
        """
        A datagram forged from an echo-like service on an unlisted port: it
        answers each answer at once.  After the loop budget it stops.
        """
        proto = DatagramEcho(
            replace(EchoSettings(), udp_rate=1e6, udp_burst=1000), self.clock
        )
        transport = FakeDatagramTransport()
        proto.makeConnection(transport)  # type: ignore[arg-type]
        peer = ("192.0.2.7", 40007)
        data = b"forged"
        for _ in range(1000):
            proto.datagramReceived(data, peer)
            if not transport.written:
                break
            ((data, _),) = transport.written
            transport.written.clear()
            self.clock.advance(0.02)  # the peer's round trip
        self.assertEqual(proto.answered, 100)
        self.assertEqual(proto.dropped["loop_budget"], 1)
        # The loop is over; after a pause that peer is answered again.
        self.clock.advance(0.5)
        proto.datagramReceived(b"hi", peer)
        self.assertEqual(transport.written, [(b"HI", peer)])

    def test_a_client_that_waits_for_answers_is_not_cut(self) -> None:
        proto = DatagramEcho(
            replace(EchoSettings(), udp_rate=1e6, udp_burst=1000), self.clock
        )
        transport = FakeDatagramTransport()
        proto.makeConnection(transport)  # type: ignore[arg-type]
        for _ in range(20):
            for _ in range(50):
                proto.datagramReceived(b"x", ("127.0.0.1", 40000))
                self.clock.advance(0.001)
            self.clock.advance(0.5)
        self.assertEqual(proto.answered, 1000)

    def test_loop_budget_off_and_reloaded(self) -> None:
        settings = replace(
            EchoSettings(), udp_rate=1e6, udp_burst=1e6, udp_loop_budget=0
        )
        proto = DatagramEcho(settings, self.clock)
        proto.makeConnection(FakeDatagramTransport())  # type: ignore[arg-type]
        for _ in range(500):
            proto.datagramReceived(b"x", ("127.0.0.1", 40000))
        self.assertEqual(proto.answered, 500)
        proto.reconfigure(Config(echo=replace(settings, udp_loop_budget=10)))
        for _ in range(20):
            proto.datagramReceived(b"x", ("127.0.0.1", 40001))
        self.assertEqual(proto.answered, 510)
        self.assertEqual(proto.dropped["loop_budget"], 10)

    def test_forged_flood_leaves_a_known_source_its_rate(self) -> None:
        proto = DatagramEcho(
            replace(EchoSettings(), udp_rate=10, udp_burst=10, udp_total_rate=1000),
            self.clock,
        )
        transport = FakeDatagramTransport()
        proto.makeConnection(transport)  # type: ignore[arg-type]
        known = ("127.0.0.1", 40000)
        proto.datagramReceived(b"hello", known)
        for tick in range(10_000):  # 5,000 forged sources a second for 2 s
            self.clock.advance(0.0002)
            proto.datagramReceived(b"x", (f"10.{tick // 250}.{tick % 250}.1", 40000))
            if tick % 500 == 0:  # 10 a second
                proto.datagramReceived(b"still here", known)
        answers = [data for data, addr in transport.written if addr == known]
        self.assertEqual(len(answers), 1 + 20)
        self.assertLessEqual(proto.answered - 21, 500 + 2 * 500)

    def test_send_errors_counted_not_fatal(self) -> None:
        for code in (errno.ENOBUFS, errno.EAGAIN, errno.EHOSTUNREACH):
            self.transport.error = OSError(code, "boom")
            self.proto.datagramReceived(b"a", ("127.0.0.4", 5000))
        self.assertEqual(self.proto.dropped["send_error"], 3)
        self.transport.error = None
        self.proto.datagramReceived(b"a", ("127.0.0.4", 5000))
        self.assertEqual(self.transport.written, [(b"A", ("127.0.0.4", 5000))])


class LoggingTests(SynchronousTestCase):
    def test_untrusted_bytes_escaped_in_logs(self) -> None:
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import formatEvent, globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        proto = DatagramEcho(replace(EchoSettings()), clock)
        proto.makeConnection(FakeDatagramTransport(OSError(errno.ENOBUFS, "x")))  # type: ignore[arg-type]
        proto.datagramReceived(b"a", ("\x1b[2J\r\nevil", 5000))
        text = " ".join(formatEvent(e) for e in events)
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\r", text)
        self.assertIn("\\x1b[2J\\r\\nevil", text)


class StringTransportSanity(SynchronousTestCase):
    def test_raw_on_plain_transport(self) -> None:
        f = factory(mode="raw")
        proto = f.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"x")
        self.assertEqual(transport.value(), b"X")


class ConnectionLogTests(SynchronousTestCase):
    def test_one_structured_line_per_connection(self) -> None:
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        proto, transport = connect(factory(clock), "127.0.0.9")
        clock.advance(2.5)
        transport.loseConnection()
        (event,) = [e for e in events if "disconnected" in e["log_format"]]
        self.assertEqual(event["service"], "echo")
        self.assertEqual(event["peer"], "127.0.0.9:40000")
        self.assertEqual(event["duration"], 2.5)


class UdpSettingsTests(SynchronousTestCase):
    def test_loop_keys_parsed_and_checked(self) -> None:
        from sockd.core.config import ConfigError, parse

        echo = parse(
            "[echo]\nudp_allow_privileged_ports = yes\nudp_loop_budget = 0\n"
            "udp_loop_pause = 2\n"
        ).echo
        self.assertEqual(
            (
                echo.udp_allow_privileged_ports,
                echo.udp_loop_budget,
                echo.udp_loop_pause,
            ),
            (True, 0, 2.0),
        )
        for line, allowed in [
            ("udp_loop_budget = -1", "whole number from 0"),
            ("udp_loop_pause = 0", "seconds from 0.01 to 60"),
            ("udp_allow_privileged_ports = maybe", "true or false"),
        ]:
            with self.assertRaises(ConfigError) as raised:
                parse(f"[echo]\n{line}\n")
            self.assertIn(allowed, str(raised.exception))


class DatagramAccessTests(SynchronousTestCase):
    def test_denied_source_dropped_before_any_reply_or_budget(self) -> None:
        from sockd.core.limits import AccessList

        proto = DatagramEcho(EchoSettings(), Clock())
        transport = FakeDatagramTransport()
        proto.makeConnection(transport)  # type: ignore[arg-type]
        deny = AccessList(deny=settings_networks("127.0.0.3 ::ffff:127.0.0.4"))
        proto.set_access(deny, AccessList())
        proto.datagramReceived(b"x", ("127.0.0.3", 5000))
        proto.datagramReceived(b"x", ("::ffff:127.0.0.4", 5000))
        self.assertEqual(transport.written, [])
        self.assertEqual(proto.dropped["acl"], 2)
        self.assertEqual(proto.limiter.sources, {})  # no rate-limit state
        self.assertEqual(proto.loops.peers, {})
        proto.datagramReceived(b"x", ("127.0.0.2", 5000))
        self.assertEqual(transport.written, [(b"X", ("127.0.0.2", 5000))])
        # A reload to an empty list answers everyone again.
        proto.set_access(AccessList(), AccessList())
        proto.datagramReceived(b"y", ("127.0.0.3", 5000))
        self.assertEqual(transport.written[-1], (b"Y", ("127.0.0.3", 5000)))
        self.assertIn(
            (
                "datagrams_dropped_total",
                "counter",
                {"service": "echo", "reason": "acl"},
                2,
            ),
            proto.metrics(),
        )


def settings_networks(text: str) -> Any:
    from sockd.core.config import networks

    return networks(text, ROOT)
