"""
Property-based fuzzing of the echo protocols, beyond tests/echo/test_protocol.py:
arbitrary bytes split at arbitrary points give the same answer as the same
bytes in one read (line and raw mode), and a UDP reply is never larger
than its request.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sockd.core.config import EchoSettings
from sockd.echo.protocol import LOOP_PORTS, DatagramEcho, EchoFactory, upper_within
from tests.helpers import FakeDatagramTransport, connect

#: bytes that matter to the line protocol, mixed into arbitrary ones
SPECIAL = st.sampled_from(
    [
        *(b"\n", b"\r\n", b"\r", b"\xff", b"\xff\xff", b"\xff\xfd\x01", b"\xff\xfa"),
        *(b"\xff\xf0", b"\xc3\xa9", b"\xce\x90", b"\xc3", b"x" * 15, b"y" * 17),
    ]
)
STREAM = st.lists(st.one_of(st.binary(max_size=12), SPECIAL), max_size=12).map(b"".join)
#: what the server sends for a telnet option request: IAC WONT/DONT option
REFUSAL = re.compile(rb"\xff[\xfc\xfe].", re.DOTALL)
CUTS = st.lists(st.integers(min_value=0, max_value=400), max_size=8)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def run(chunks: list[bytes], half_close: bool, **changes: Any) -> tuple[bytes, bool]:
    factory = EchoFactory(replace(EchoSettings(), **changes), Clock(), 2.0)
    proto, transport = connect(factory)
    for chunk in chunks:
        proto.dataReceived(chunk)
    if half_close and transport.connected:
        proto.readConnectionLost()
    return bytes(transport.value()), transport.connected


class SplitTests(SynchronousTestCase):
    @given(
        data=STREAM,
        cuts=CUTS,
        half_close=st.booleans(),
        transform=st.sampled_from(["upper", "none"]),
    )
    @settings(max_examples=1500, deadline=None)
    def test_line_mode_split_does_not_matter(
        self, data: bytes, cuts: list[int], half_close: bool, transform: str
    ) -> None:
        """Where a read ends changes nothing: answers, refusals, closing."""
        keys = {"max_line_length": 16, "transform": transform}
        whole, open_whole = run([data], half_close, **keys)
        out, still_open = run(split(data, cuts), half_close, **keys)
        # Telnet refusals are written as soon as a read is filtered, so they
        # may come before the answer to a line that preceded them.
        self.assertEqual(REFUSAL.sub(b"", out), REFUSAL.sub(b"", whole))
        self.assertEqual(still_open, open_whole)
        if still_open:
            # (After a refused line, bytes read with it are not looked at.)
            self.assertEqual(len(REFUSAL.findall(out)), len(REFUSAL.findall(whole)))

    def test_crlf_split_at_the_limit(self) -> None:
        """Found by the property above: a line of exactly the limit, its CRLF
        split across two reads, was refused as too long."""
        line = b"x" * 16 + b"\r\n"
        for cut in range(len(line) + 1):
            out = run([line[:cut], line[cut:]], False, max_line_length=16)
            self.assertEqual(out, (b"X" * 16 + b"\r\n", True), cut)
        out = run([b"x" * 16 + b"\r", b"y\n"], False, max_line_length=16)
        self.assertEqual(out, (b"ERR line longer than 16 bytes; closing\r\n", False))

    @given(
        data=st.binary(max_size=200),
        cuts=CUTS,
        transform=st.sampled_from(["upper", "none"]),
    )
    @settings(max_examples=200, deadline=None)
    def test_raw_mode_is_the_transform(
        self, data: bytes, cuts: list[int], transform: str
    ) -> None:
        out, connected = run(split(data, cuts), False, mode="raw", transform=transform)
        self.assertEqual(out, data.upper() if transform == "upper" else data)
        self.assertTrue(connected)


class DatagramTests(SynchronousTestCase):
    @given(
        datagrams=st.lists(
            st.tuples(
                st.binary(max_size=70),
                st.sampled_from([0, 7, 53, 123, 5000, 9001, 40000]),
            ),
            max_size=20,
        ),
        transform=st.sampled_from(["upper", "none"]),
    )
    @settings(max_examples=300, deadline=None)
    def test_reply_never_larger_and_never_truncated(
        self, datagrams: list[tuple[bytes, int]], transform: str
    ) -> None:
        proto = DatagramEcho(
            replace(
                EchoSettings(),
                udp_max_datagram=64,
                udp_rate=1000,
                udp_burst=1000,
                transform=transform,
            ),
            Clock(),
            own_ports=[9001],
        )
        transport = FakeDatagramTransport()
        proto.makeConnection(transport)  # type: ignore[arg-type]
        expected = []
        sizes = []
        for data, port in datagrams:
            addr = ("127.0.0.1", port)
            proto.datagramReceived(data, addr)
            if port not in LOOP_PORTS | {9001} and len(data) <= 64:
                reply = upper_within(data) if transform == "upper" else data
                expected.append((reply, addr))
                sizes.append(len(data))
        # One whole reply per datagram answered, none for loops or oversized.
        self.assertEqual(transport.written, expected)
        for (reply, _), size in zip(transport.written, sizes, strict=True):
            self.assertLessEqual(len(reply), size)
