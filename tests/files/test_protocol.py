"""
Tests for L{sockd.files.protocol}: the file protocol on in-memory transports (bare,
Gopher, framed, uploads, limits), and aborted transfers over real loopback
connections for the descriptor count.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactor,
    StringTransport,
    StringTransportWithDisconnection,
)
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import sockd.core.config as config
import sockd.files.codec as codec
import sockd.files.protocol as files
import sockd.files.state as file_state
import sockd.files.tap as file_tap
from sockd import tap
from sockd.core.limits import AccessList
from sockd.core.proxy import ProxyHeaderFactory
from sockd.files.codec import percent_decode, percent_encode
from sockd.files.paths import PathError
from sockd.files.protocol import FileFactory
from sockd.files.state import FileState, Peer, sweep_uploads
from tests.helpers import connect, settings

reactor: Any = _reactor
CANARY = b"CANARY-never-served"
BODY = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4, patterned


def make_tree(base: Path) -> Path:
    (base / "canary").write_bytes(CANARY)
    root = base / "files"
    root.mkdir()
    (root / "notes.txt").write_bytes(b"hello notes\n")
    (root / "big.bin").write_bytes(BODY)
    (root / "empty").write_bytes(b"")
    (root / "with space%.txt").write_bytes(b"spaced\n")
    (root / ".hidden").write_bytes(b"hidden\n")
    (root / "docs").mkdir()
    (root / "docs" / "README.txt").write_bytes(b"readme\n")
    os.symlink("../canary", root / "out")
    os.mkfifo(root / "fifo")
    return root


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir()
        self.root = make_tree(self.base)
        self.clock = Clock()
        self.factory = self.make()

    def make(self, **keys: str) -> FileFactory:
        if "upload_allow" not in keys and "upload_clients" not in keys:
            # Who may upload has tests of its own (tests/files/test_state.py).
            keys["upload_allow"] = "0.0.0.0/0 ::/0"
        config = settings(file={"root": str(self.root), "enabled": "true", **keys})
        state = FileState(config.file, self.clock)
        self.addCleanup(state.root.close)
        return FileFactory(state, self.clock, abort_grace=5)

    def connect(self, factory: FileFactory | None = None, port: int = 40000) -> Any:
        protocol, transport = connect(factory or self.factory, port=port)
        return protocol, transport

    def pump(self, transport: Any, turns: int = 1000) -> None:
        """Run the file sender (a pull producer) until it is done."""
        for _ in range(turns):
            producer = transport.producer
            if producer is None or producer is transport:
                return
            producer.resumeProducing()
        raise AssertionError("transfer did not finish")

    def exchange(self, data: bytes, factory: FileFactory | None = None) -> bytes:
        protocol, transport = self.connect(factory)
        protocol.dataReceived(data)
        self.pump(transport)
        return bytes(transport.value())


class BareTests(Base):
    def test_line(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"notes.txt\n")
        self.pump(transport)
        self.assertEqual(transport.value(), b"hello notes\n")
        self.assertFalse(transport.connected)  # closed after the file

    def test_crlf_and_slash(self) -> None:
        self.assertEqual(self.exchange(b"/notes.txt\r\n"), b"hello notes\n")

    def test_big_file_whole(self) -> None:
        self.assertEqual(self.exchange(b"big.bin\n"), BODY)

    def test_empty_file(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"empty\n")
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.connected)

    def test_byte_at_a_time(self) -> None:
        protocol, transport = self.connect()
        for byte in b"notes.txt\r\n":
            protocol.dataReceived(bytes((byte,)))
        self.pump(transport)
        self.assertEqual(transport.value(), b"hello notes\n")

    def test_no_newline_pause(self) -> None:
        """The tutorial's client: the name, no newline, then it waits."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"notes")
        self.clock.advance(0.2)
        protocol.dataReceived(b".txt")
        self.clock.advance(0.2)  # the pause restarts with each byte
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.11)
        self.pump(transport)
        self.assertEqual(transport.value(), b"hello notes\n")
        self.assertFalse(transport.connected)

    def test_no_newline_half_close(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"notes.txt")
        protocol.readConnectionLost()
        self.pump(transport)
        self.assertEqual(transport.value(), b"hello notes\n")
        self.assertFalse(transport.connected)

    def test_half_close_after_line(self) -> None:
        """nc -N: the request, then EOF, still gets the whole file."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"big.bin\n")
        protocol.readConnectionLost()
        self.pump(transport)
        self.assertEqual(transport.value(), BODY)

    def test_gopher_tab(self) -> None:
        self.assertEqual(self.exchange(b"/notes.txt\t+\r\n"), b"hello notes\n")

    def test_menu(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"\r\n")
        self.clock.advance(0)  # a listing starts on the next turn
        self.assertFalse(transport.connected)
        lines = transport.value().split(b"\r\n")
        self.assertEqual(lines[-2:], [b".", b""])
        self.assertEqual(
            lines[:-2],
            [
                b"9big.bin\t/big.bin\t127.0.0.1\t9000",
                b"1docs\t/docs\t127.0.0.1\t9000",
                b"0empty\t/empty\t127.0.0.1\t9000",  # no suffix, empty: text
                b"0notes.txt\t/notes.txt\t127.0.0.1\t9000",
                b"0with space%.txt\t/with space%.txt\t127.0.0.1\t9000",
            ],
        )  # no hidden file, no FIFO, no symlink leading out

    def test_submenu(self) -> None:
        value = self.exchange(b"/docs\r\n")
        self.assertEqual(
            value, b"0README.txt\t/docs/README.txt\t127.0.0.1\t9000\r\n.\r\n"
        )

    def test_errors_close_silently(self) -> None:
        for request in (b"missing\n", b"../canary\n", b"out\n", b"fifo\n", b"a\\b\n"):
            protocol, transport = self.connect()
            protocol.dataReceived(request)
            self.assertEqual(transport.value(), b"", request)
            self.assertFalse(transport.connected)

    def test_errors_as_lines(self) -> None:
        factory = self.make(bare_errors="line")
        cases = {
            b"missing\n": b"ERR 404 not found\r\n",
            b"../canary\n": b"ERR 403 path segments . and .. are not allowed\r\n",
            b"fifo\n": b"ERR 405 not a regular file\r\n",
            b"out\n": b"ERR 403 leads outside the root\r\n",
        }
        for request, answer in cases.items():
            self.assertEqual(self.exchange(request, factory), answer)

    def test_keyword_needs_space(self) -> None:
        """GETx is a bare selector, not a command."""
        (self.root / "GETx").write_bytes(b"odd name\n")
        self.assertEqual(self.exchange(b"GETx\n"), b"odd name\n")

    def test_refusal_logged_escaped(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.exchange(b"../\x1b[31mx\r\n")
        texts = [e.get("path") for e in events if e.get("code") == 400]
        self.assertEqual(texts, ["../\\x1b[31mx"])


class FramedTests(Base):
    def test_get(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET notes.txt\r\n")
        self.pump(transport)
        mtime = int((self.root / "notes.txt").stat().st_mtime)
        self.assertEqual(
            transport.value(), b"OK 12 size=12 mtime=%d\r\nhello notes\n" % mtime
        )
        self.assertTrue(transport.connected)  # framed: stays open

    def test_pipelined(self) -> None:
        """Several requests in one read are answered in order."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET big.bin\nGET notes.txt 6\nSTAT docs\nQUIT\n")
        self.pump(transport)
        self.pump(transport)
        value = transport.value()
        header, _, rest = value.partition(b"\r\n")
        self.assertTrue(header.startswith(b"OK %d size=%d " % (len(BODY), len(BODY))))
        self.assertEqual(rest[: len(BODY)], BODY)
        rest = rest[len(BODY) :]
        self.assertTrue(rest.startswith(b"OK 6 size=12 "))
        self.assertIn(b"\r\nnotes\nOK type=dir size=", rest)
        self.assertTrue(rest.endswith(b"OK bye\r\n"))
        self.assertFalse(transport.connected)

    def test_many_pipelined_instant_answers(self) -> None:
        """Thousands of requests answered at once in one read: no recursion."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET empty\nSUM notes.txt\n")
        self.clock.advance(0)  # the checksum is now cached
        transport.clear()
        protocol.dataReceived(b"GET empty\nSUM notes.txt\n" * 3000)
        # At most REQUESTS_PER_TURN answers per reactor turn: others get theirs.
        self.assertEqual(transport.value().count(b"\r\n"), files.REQUESTS_PER_TURN)
        self.assertEqual(transport.producerState, "paused")
        for _ in range(6000 // files.REQUESTS_PER_TURN + 1):
            self.clock.advance(0)
        value = transport.value()
        self.assertEqual(value.count(b"OK 0 size=0 "), 3000)
        self.assertEqual(value.count(b"OK sha256="), 3000)
        self.assertTrue(transport.connected)

    def test_reading_paused_during_transfer(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET big.bin\n")
        self.assertEqual(transport.producerState, "paused")
        self.pump(transport)
        self.assertEqual(transport.producerState, "producing")
        self.assertIs(transport.producer, transport)  # backpressure restored

    def test_ranges(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET big.bin 1000 10\n")
        self.pump(transport)
        self.assertTrue(transport.value().startswith(b"OK 10 size=%d " % len(BODY)))
        self.assertTrue(transport.value().endswith(b"\r\n" + BODY[1000:1010]))
        transport.clear()
        protocol.dataReceived(b"GET big.bin %d\n" % (len(BODY) - 2))
        self.pump(transport)
        self.assertTrue(transport.value().endswith(b"\r\nil"))
        transport.clear()
        protocol.dataReceived(b"GET notes.txt 12\n")
        self.assertTrue(transport.value().startswith(b"OK 0 size=12 "))
        transport.clear()
        protocol.dataReceived(b"GET notes.txt 13\n")
        self.assertEqual(
            transport.value(),
            b"ERR 416 offset 13 is beyond the end (12 bytes)\r\n",
        )
        transport.clear()
        protocol.dataReceived(b"GET notes.txt -1\nGET notes.txt 1 x\n")
        self.assertEqual(transport.value().count(b"ERR 400 expected a whole number"), 2)
        self.assertTrue(transport.connected)

    def test_errors_keep_connection(self) -> None:
        protocol, transport = self.connect()
        cases = [
            (b"GET missing", b"ERR 404 not found"),
            (b"GET docs", b"ERR 405 is a directory, not a regular file"),
            (b"GET fifo", b"ERR 405 not a regular file"),
            (b"GET ../canary", b"ERR 403 path segments . and .. are not allowed"),
            (b"GET %2e%2e/canary", b"ERR 403 path segments . and .. are not allowed"),
            (b"GET out", b"ERR 403 leads outside the root"),
            (b"GET .hidden", b"ERR 403 hidden: hidden files are not served"),
            (b"GET a%00b", b"ERR 400 NUL byte in path"),
            (b"GET a%zz", b"ERR 400 bad %XX escape in path"),
            (b"GET %ff", b"ERR 400 path is not valid UTF-8"),
            (b"GET " + b"x" * 256, b"ERR 414 path component longer than 255 bytes"),
            (b"GET " + b"a/" * 2049, b"ERR 414 path longer than 4096 bytes"),
            (b"GET  notes.txt", b"ERR 400 arguments are separated by single spaces"),
            (b"GET", b"ERR 400 usage: GET <path> [<offset> [<length>]]"),
            (b"FETCH x", b"ERR 400 unknown command; send HELP for the list"),
            (b"SUM docs", b"ERR 405 is a directory, not a regular file"),
            (b"LIST notes.txt", b"ERR 405 not a directory"),
            (b"PUT x 1", b"ERR 403 readonly: this server does not accept uploads"),
        ]
        for request, answer in cases:
            protocol.dataReceived(b"HELP\n" if not protocol.mode else b"")
            transport.clear()
            protocol.dataReceived(request + b"\r\n")
            self.assertEqual(transport.value(), answer + b"\r\n", request)
        self.assertFalse(transport.connected)  # the refused PUT closes

    def test_out_of_descriptors(self) -> None:
        """EMFILE while listing: one request fails with 500, nothing crashes."""

        def exhausted(fd: int) -> Any:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        self.patch(file_state.os, "scandir", exhausted)
        protocol, transport = self.connect()
        protocol.dataReceived(b"LIST\n")
        self.assertEqual(
            transport.value(), b"ERR 500 internal error: Too many open files\r\n"
        )
        protocol, transport = self.connect(self.make(bare_errors="line"))
        protocol.dataReceived(b"/\n")
        self.assertEqual(
            transport.value(), b"ERR 500 internal error: Too many open files\r\n"
        )
        protocol, transport = self.connect()
        protocol.dataReceived(b"/\r\n")  # a Gopher client: an error item
        self.assertEqual(
            transport.value(),
            b"3500 internal error: Too many open files\t\terror.host\t1\r\n.\r\n",
        )

    def test_percent_encoded_path(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET with%20space%25.txt\n")
        self.pump(transport)
        self.assertTrue(transport.value().endswith(b"\r\nspaced\n"))

    def test_stat(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"STAT notes.txt\nSTAT /\n")
        info = (self.root / "notes.txt").stat()
        lines = transport.value().split(b"\r\n")
        self.assertEqual(lines[0], b"OK type=file size=12 mtime=%d" % info.st_mtime)
        self.assertTrue(lines[1].startswith(b"OK type=dir size="))

    def test_list(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"LIST\n")
        self.clock.advance(0)
        lines = transport.value().split(b"\r\n")
        mtime = int((self.root / "notes.txt").stat().st_mtime)
        self.assertEqual(lines[0], b"OK")
        self.assertEqual(lines[-2:], [b".", b""])
        names = [line.split(b" ", 3)[3] for line in lines[1:-2]]
        self.assertEqual(
            names, [b"big.bin", b"docs", b"empty", b"notes.txt", b"with%20space%25.txt"]
        )
        self.assertIn(b"f 12 %d notes.txt" % mtime, lines)
        self.assertTrue(lines[2].startswith(b"d "))
        transport.clear()
        protocol.dataReceived(b"LIST docs\n")
        self.clock.advance(0)
        self.assertEqual(transport.value().count(b"README.txt"), 1)

    def test_help_and_quit(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"HELP\n")
        value = transport.value()
        self.assertTrue(value.startswith(b"OK\r\n"))
        self.assertTrue(value.endswith(b"\r\n.\r\n"))
        self.assertIn(b"GET <path>", value)
        transport.clear()
        protocol.dataReceived(b"QUIT\n")
        self.assertEqual(transport.value(), b"OK bye\r\n")
        self.assertFalse(transport.connected)

    def test_line_too_long(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET " + b"x" * codec.MAX_LINE)
        self.assertEqual(
            transport.value(),
            b"ERR 414 request line longer than %d bytes\r\n" % codec.MAX_LINE,
        )
        self.assertFalse(transport.connected)

    def test_half_close_pipelined(self) -> None:
        """Requests then EOF: every answer, including one with no newline."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"STAT notes.txt\nGET notes.txt")
        protocol.readConnectionLost()
        self.pump(transport)
        self.assertTrue(transport.value().endswith(b"\r\nhello notes\n"))
        self.assertFalse(transport.connected)

    def test_file_shrinks(self) -> None:
        """Truncated mid-send: the connection closes, short of the header."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET big.bin\n")
        transport.producer.resumeProducing()
        os.truncate(self.root / "big.bin", 300 * 1024)
        self.pump(transport)
        header, _, body = transport.value().partition(b"\r\n")
        self.assertTrue(header.startswith(b"OK %d " % len(BODY)))
        self.assertEqual(body, BODY[: 300 * 1024])
        self.assertFalse(transport.connected)

    def test_client_gone_closes_file(self) -> None:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(100):
            protocol, transport = self.connect()
            protocol.dataReceived(b"GET big.bin\n")
            transport.producer.resumeProducing()
            transport.loseConnection()
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        self.assertEqual(self.factory.limiter.total, 0)


class SumTests(Base):
    def test_sum_and_cache(self) -> None:
        """Hashed in bounded steps, one per reactor turn, then remembered."""
        self.patch(file_state, "HASH_STEP", 64 * 1024)
        reads: list[int] = []
        real = os.pread

        def pread(fd: int, size: int, offset: int) -> bytes:
            reads.append(size)
            return real(fd, size, offset)

        self.patch(file_state.os, "pread", pread)
        protocol, transport = self.connect()
        protocol.dataReceived(b"SUM big.bin\nSTAT notes.txt\n")
        self.assertEqual(transport.value(), b"")  # hashing, STAT waits
        self.clock.advance(0)
        self.assertEqual(reads, [64 * 1024] * 18)  # 1 MiB + 4, then the end
        digest = hashlib.sha256(BODY).hexdigest().encode()
        lines = transport.value().split(b"\r\n")
        self.assertTrue(
            lines[0].startswith(b"OK sha256=%s size=%d " % (digest, len(BODY)))
        )
        self.assertTrue(lines[1].startswith(b"OK type=file"))
        transport.clear()
        protocol.dataReceived(b"SUM big.bin\n")  # cached: at once
        self.assertTrue(transport.value().startswith(b"OK sha256=%s " % digest))

    def test_changed_file_rehashed(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"SUM notes.txt\n")
        self.clock.advance(0)
        self.clock.advance(0)
        first = transport.value()
        self.assertIn(hashlib.sha256(b"hello notes\n").hexdigest().encode(), first)
        path = self.root / "notes.txt"
        info = path.stat()
        path.write_bytes(b"HELLO NOTES\n")  # same size
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
        transport.clear()
        protocol.dataReceived(b"SUM notes.txt\n")
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertIn(
            hashlib.sha256(b"HELLO NOTES\n").hexdigest().encode(), transport.value()
        )

    def test_lost_while_hashing(self) -> None:
        before = len(os.listdir("/proc/self/fd"))
        protocol, transport = self.connect()
        protocol.dataReceived(b"SUM big.bin\n")
        transport.loseConnection()
        self.clock.advance(0)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LimitTests(Base):
    def test_slowloris(self) -> None:
        """A byte a second keeps the idle timer alive, not the request."""
        factory = self.make(request_timeout="10", idle_timeout="300")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"GET ")
        for _ in range(9):
            self.clock.advance(1)
            protocol.dataReceived(b"x")
        self.assertTrue(transport.connected)
        self.clock.advance(1.01)
        self.assertFalse(transport.connected)

    def test_idle(self) -> None:
        factory = self.make(idle_timeout="60")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"STAT notes.txt\n")
        self.clock.advance(59)
        self.assertTrue(transport.connected)
        self.clock.advance(2)
        self.assertFalse(transport.connected)

    def test_caps(self) -> None:
        factory = self.make(max_connections="3", max_connections_per_ip="2")
        kept = [self.connect(factory, port=40000 + i) for i in range(2)]
        _, third = connect(factory, host="127.0.0.1", port=40100)
        self.assertEqual(
            third.value(), b"ERR 429 too many connections from your address\r\n"
        )
        _, other = connect(factory, host="127.0.0.2", port=40101)
        self.assertEqual(other.value(), b"")  # another source is served
        # Full, and no address holds two more than 127.0.0.2 does: refused.
        # (A third address would be admitted in place of an idle connection
        # of 127.0.0.1's; see sockd.core.limits.ConnectionLimiter.)
        _, fourth = connect(factory, host="127.0.0.2", port=40102)
        self.assertEqual(
            fourth.value(), b"ERR 429 too many connections to this server\r\n"
        )
        self.assertEqual(len(kept), 2)

    def test_rate_limit(self) -> None:
        factory = self.make(rate_limit="256K")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"big.bin\n")
        for _ in range(10):
            transport.producer.resumeProducing()
        self.assertEqual(len(transport.value()), 256 * 1024)
        for _ in range(50):
            self.clock.advance(0.1)
            if transport.producer is not None:
                transport.producer.resumeProducing()
        self.assertEqual(transport.value(), BODY)
        self.assertGreater(self.clock.seconds(), 2.9)


def turn(clock: Clock) -> None:
    """One reactor iteration: the calls due now, not those they schedule."""
    now = clock.seconds()
    for call in [c for c in clock.getDelayedCalls() if c.getTime() <= now]:
        if call.active():
            clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


MANY = 3000  # entries in the directory "many": listed over many turns


class ListingTests(Base):
    """
    Listings of a big directory are produced a slice per reactor turn, stop
    while the transport is paused, are capped with a marker, and release
    the directory when the connection goes.
    """

    def setUp(self) -> None:
        super().setUp()
        many = self.root / "many"
        many.mkdir()
        for i in range(MANY):
            (many / f"n{i:05d}.txt").write_bytes(b"x" * (i % 7))
        for i in range(50):
            (many / f".hidden{i}").write_bytes(b"")  # read, never listed
        os.mkfifo(many / "z-fifo")

    def expected_list(self, limit: int = MANY) -> bytes:
        many = self.root / "many"
        lines = [b"OK\r\n"]
        for i in range(min(limit, MANY)):
            info = (many / f"n{i:05d}.txt").stat()
            lines.append(b"f %d %d n%05d.txt\r\n" % (i % 7, int(info.st_mtime), i))
        if limit < MANY:
            lines.append(b"truncated more than %d entries\r\n" % limit)
        return b"".join(lines) + b".\r\n"

    def turns(self, transport: Any, most: int = 1000) -> list[int]:
        """Run turns until the listing is done; the bytes written in each."""
        written = []
        for _ in range(most):
            if transport.producer is transport or not transport.connected:
                return written
            before = len(transport.value())
            turn(self.clock)
            written.append(len(transport.value()) - before)
        raise AssertionError("the listing did not finish")

    def test_sliced_over_turns(self) -> None:
        """3000 entries: many turns, each bounded; the same bytes as ever."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"LIST many\n")
        self.assertEqual(transport.value(), b"")  # not in the request's turn
        written = self.turns(transport)
        self.assertEqual(transport.value(), self.expected_list())
        self.assertGreaterEqual(len(written), MANY // file_state.SCAN_ENTRIES)
        # A turn checks at most SCAN_ENTRIES names: that many lines at most.
        longest = max(len(line) + 2 for line in transport.value().split(b"\r\n"))
        self.assertLessEqual(max(written), file_state.SCAN_ENTRIES * longest)

    def test_paused_transport_gets_nothing(self) -> None:
        """A client that does not read: no entries, no timer, until resumed."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"LIST many\n")
        for _ in range(5):
            turn(self.clock)
        sender = transport.producer
        self.assertIsInstance(sender, files.ListSender)
        sender.pauseProducing()  # as a transport whose buffer is full does
        so_far = transport.value()
        self.assertGreater(len(so_far), 0)
        for _ in range(50):
            turn(self.clock)
            self.clock.advance(1)
        self.assertEqual(transport.value(), so_far)
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if c.getTime() < 60], []
        )  # only the idle timer: nothing polls
        sender.resumeProducing()
        self.turns(transport)
        self.assertEqual(transport.value(), self.expected_list())

    def test_truncated_at_the_cap(self) -> None:
        factory = self.make(max_list_entries="100")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"LIST many\n")
        self.turns(transport)
        self.assertEqual(transport.value(), self.expected_list(100))
        # Exactly at the cap is complete: no marker.
        protocol, transport = self.connect(self.make(max_list_entries="1"))
        protocol.dataReceived(b"LIST docs\n")
        self.turns(transport)
        self.assertNotIn(b"truncated", transport.value())
        self.assertTrue(transport.value().endswith(b" README.txt\r\n.\r\n"))

    def test_cap_setting_checked(self) -> None:
        for bad in ("0", "100001", "lots"):
            with self.assertRaises(config.ConfigError) as caught:
                settings(file={"max_list_entries": bad})
            self.assertIn(
                f"[file] max_list_entries = {bad!r}: expected a whole number "
                "from 1 to 100000",
                str(caught.exception),
            )
        self.assertEqual(settings().file.max_list_entries, file_state.MAX_LISTING)

    def test_menu_sliced_and_truncated(self) -> None:
        """A Gopher menu the same way, with an informational marker line."""
        protocol, transport = self.connect(self.make(max_list_entries="2000"))
        protocol.dataReceived(b"/many\r\n")
        written = self.turns(transport)
        self.assertGreater(len(written), 10)
        lines = transport.value().split(b"\r\n")
        self.assertEqual(len(lines), 2000 + 3)
        self.assertEqual(lines[0], b"0n00000.txt\t/many/n00000.txt\t127.0.0.1\t9000")
        self.assertEqual(
            lines[-3:],
            [b"itruncated: more than 2000 entries\t\t127.0.0.1\t9000", b".", b""],
        )
        self.assertFalse(transport.connected)

    def test_names_read_at_most(self) -> None:
        """Past MAX_SCAN names the rest is not read, and the listing says so."""
        self.patch(file_state, "MAX_SCAN", 1000)
        protocol, transport = self.connect()
        protocol.dataReceived(b"LIST many\n")
        self.turns(transport)
        lines = transport.value().split(b"\r\n")
        self.assertLess(len(lines), 1000)
        self.assertEqual(
            lines[-3:], [b"truncated more than 1000 names in the directory", b".", b""]
        )

    def test_pipelined_in_order(self) -> None:
        """Pipelined LISTs: one after another, each whole, as if alone."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"LIST many\nLIST docs\nLIST many\nSTAT docs\n")
        written = self.turns(transport)
        docs = b"OK\r\nf 7 %d README.txt\r\n.\r\n" % int(
            (self.root / "docs" / "README.txt").stat().st_mtime
        )
        stat_ = b"OK type=dir size=%d mtime=%d\r\n" % (
            (self.root / "docs").stat().st_size,
            int((self.root / "docs").stat().st_mtime),
        )
        whole = self.expected_list()
        self.assertEqual(transport.value(), whole + docs + whole + stat_)
        longest = max(len(line) + 2 for line in whole.split(b"\r\n"))
        self.assertLessEqual(
            max(written), file_state.SCAN_ENTRIES * longest + len(docs)
        )

    def test_small_pipelined_one_per_turn(self) -> None:
        """Many small LISTs at once: answered one per turn, not all at once."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"LIST docs\n" * 50)
        for done in range(1, 6):
            turn(self.clock)
            self.assertEqual(transport.value().count(b"\r\n.\r\n"), done)
        self.turns(transport)
        self.assertEqual(transport.value().count(b"\r\n.\r\n"), 50)

    def test_lost_mid_listing_releases_everything(self) -> None:
        before = len(os.listdir("/proc/self/fd"))
        protocol, transport = self.connect()
        protocol.dataReceived(b"LIST many\n")
        turn(self.clock)  # reading names: the directory is open
        self.assertEqual(len(os.listdir("/proc/self/fd")), before + 1)
        transport.loseConnection()
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(protocol._sender)

    def test_read_error_mid_scan(self) -> None:
        """The directory fails while its names are read: ERR 500, closed."""
        real = os.scandir
        closed: list[bool] = []

        class Failing:
            def __init__(self, fd: int) -> None:
                self.entries = real(fd)

            def __iter__(self) -> Failing:
                return self

            def __next__(self) -> os.DirEntry[str]:
                if len(closed) == 0 and self.entries:
                    closed.append(False)
                    return next(self.entries)
                raise OSError(errno.EIO, os.strerror(errno.EIO))

            def close(self) -> None:
                self.entries.close()
                closed.append(True)

        self.patch(file_state.os, "scandir", Failing)
        protocol, transport = self.connect()
        protocol.dataReceived(b"LIST many\nSTAT docs\n")
        self.turns(transport)
        self.assertEqual(
            transport.value(), b"ERR 500 internal error: Input/output error\r\n"
        )
        self.assertFalse(transport.connected)
        self.assertEqual(closed[-1], True)

    def test_reload_mid_listing(self) -> None:
        """A new root while listing under the old: cut short, and said so."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"LIST many\n")
        for _ in range(3):
            turn(self.clock)
        second = self.base / "second"
        second.mkdir()
        new = settings(file={"root": str(second), "enabled": "true"})
        self.factory.reconfigure(new)
        self.addCleanup(self.factory.state.root.close)
        self.turns(transport)
        self.assertTrue(
            transport.value().endswith(
                b"\r\ntruncated the server was reconfigured during the listing\r\n.\r\n"
            )
        )


class TotalRateTests(Base):
    def test_total_rate_limit_shared(self) -> None:
        """
        Two downloads under one total cap: together no faster than the
        cap (plus its one-second burst), both moving, a few large writes.
        """
        factory = self.make(total_rate_limit="256K")
        rate = 256 * 1024
        writes: list[tuple[float, int]] = []
        transports = []
        for port in (40001, 40002):
            protocol, transport = self.connect(factory, port=port)
            write = transport.write

            def record(data: bytes, write: Any = write) -> None:
                writes.append((self.clock.seconds(), len(data)))
                write(data)

            transport.write = record  # type: ignore[method-assign]
            protocol.dataReceived(b"big.bin\n")
            transports.append(transport)
        step = 1 / 128  # exact in binary: times do not drift
        for _ in range(int(10 / step)):
            self.clock.advance(step)
            sent = sum(n for when, n in writes)
            self.assertLessEqual(sent, rate * self.clock.seconds() + rate)
            if self.clock.seconds() >= 1 and sent < len(BODY):
                # Both move: the first does not have it all to itself.
                self.assertGreater(min(len(t.value()) for t in transports), 0)
        self.assertTrue(all(t.value() == BODY for t in transports))
        self.assertGreater(self.clock.seconds(), 2 * len(BODY) / rate - 1)
        self.assertFalse(any(t.connected for t in transports))
        self.assertLessEqual(len(writes), 2 * len(BODY) // (64 * 1024) + 2)


class LifecycleTests(Base):
    def test_drain_finishes_transfer(self) -> None:
        """Stopping lets a transfer in flight end, then closes."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET big.bin\nSTAT notes.txt\n")
        transport.producer.resumeProducing()
        done = self.factory.drain(30)
        self.assertTrue(transport.connected)
        self.pump(transport)
        value = transport.value()
        self.assertTrue(value.endswith(BODY + b"ERR 503 shutting down\r\n"))
        self.assertNotIn(b"OK type=", value)  # the queued STAT is not served
        self.assertFalse(transport.connected)
        self.successResultOf(done)

    def test_drain_idle_framed(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"STAT notes.txt\n")
        transport.clear()
        self.factory.drain(30)
        self.assertEqual(transport.value(), b"ERR 503 shutting down\r\n")

    def test_drain_finishes_upload(self) -> None:
        factory = self.make(writable="true")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"PUT d.bin 6\nabc")
        factory.drain(30)
        protocol.dataReceived(b"def")
        self.assertEqual((self.root / "d.bin").read_bytes(), b"abcdef")
        self.assertTrue(transport.value().endswith(b"\r\nERR 503 shutting down\r\n"))
        self.assertIn(b"OK stored 6 ", transport.value())
        self.assertFalse(transport.connected)

    def test_drain_deadline_aborts_and_cleans(self) -> None:
        """
        At the shutdown deadline an upload still receiving is removed when
        the drain fires: the reactor may stop before the aborted connection
        reaches connectionLost (seen with SIGTERM: the file stayed).
        """
        factory = self.make(writable="true")
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()  # abortConnection reports nothing back
        protocol.makeConnection(transport)
        protocol.dataReceived(b"PUT slow.bin 100\nabc")
        self.assertEqual(len([n for n in os.listdir(self.root) if "upload" in n]), 1)
        done = factory.drain(30)
        self.clock.advance(31)
        self.successResultOf(done)
        self.assertEqual(
            [n for n in os.listdir(self.root) if "slow" in n or "upload" in n], []
        )
        self.assertEqual(factory.state.uploads, set())
        protocol.connectionLost(Failure(Exception("aborted")))  # later: harmless

    def test_reconfigure(self) -> None:
        second = self.base / "second"
        second.mkdir()
        (second / "fresh.txt").write_bytes(b"fresh\n")
        new = settings(
            file={
                "root": str(second),
                "enabled": "true",
                "bare_errors": "line",
                "max_connections": "7",
                "total_rate_limit": "1M",
            }
        )
        self.factory.reconfigure(new)
        self.addCleanup(self.factory.state.root.close)
        self.assertEqual(self.factory.limiter.max_total, 7)
        self.assertEqual(self.factory.state.settings.root, second)
        self.assertIsNotNone(self.factory.state.total_bucket)
        self.assertEqual(self.exchange(b"fresh.txt\n"), b"fresh\n")
        self.assertEqual(self.exchange(b"notes.txt\n"), b"ERR 404 not found\r\n")

    def test_reconfigure_keeps_a_root_it_cannot_open(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        gone = dataclasses.replace(
            self.factory.state.settings, root=self.base / "gone", bare_errors="line"
        )
        self.factory.state.reconfigure(gone)
        self.assertEqual(self.factory.state.settings.root, self.root)
        self.assertEqual(self.exchange(b"notes.txt\n"), b"hello notes\n")
        self.assertTrue(any("reload keeps serving" in e["log_format"] for e in events))

    def test_metrics(self) -> None:
        self.exchange(b"notes.txt\n")
        self.exchange(b"missing\n")
        samples = {
            (name, labels.get("code", "")): value
            for name, _, labels, value in self.factory.metrics()
        }
        self.assertEqual(samples[("file_transfers_completed_total", "")], 1)
        self.assertEqual(samples[("file_sent_bytes_total", "")], 12)
        self.assertEqual(samples[("file_request_errors_total", "404")], 1)
        # Every documented code is there before its first use.
        self.assertEqual(samples[("file_request_errors_total", "400")], 0)
        self.assertEqual(samples[("connections_accepted_total", "")], 2)


class UploadTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.factory = self.make(writable="true", max_upload="2M")

    def leftovers(self, directory: Path | None = None) -> list[str]:
        return [n for n in os.listdir(directory or self.root) if ".sockd-upload" in n]

    def test_put(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"PUT new.bin %d\n" % len(BODY) + BODY[:1000])
        self.assertEqual(transport.value(), b"OK ready\r\n")
        self.assertFalse((self.root / "new.bin").exists())
        protocol.dataReceived(BODY[1000:] + b"STAT new.bin\n")
        digest = hashlib.sha256(BODY).hexdigest().encode()
        lines = transport.value().split(b"\r\n")
        self.assertEqual(lines[1], b"OK stored %d sha256=%s" % (len(BODY), digest))
        self.assertTrue(lines[2].startswith(b"OK type=file size=%d " % len(BODY)))
        self.assertEqual((self.root / "new.bin").read_bytes(), BODY)
        self.assertEqual(self.leftovers(), [])

    def test_put_refused_by_address_reads_unaffected(self) -> None:
        """
        A client outside upload_allow gets ERR 403 with the reason and is
        closed (its body would follow); nothing is created, reads still work,
        and the refusal is counted by reason.
        """
        factory = self.make(writable="true", upload_allow="127.0.0.2")
        protocol, transport = connect(factory, host="127.0.0.3")
        protocol.dataReceived(b"PUT new.bin 3\nabc")
        self.assertEqual(
            transport.value(),
            b"ERR 403 unauthorised: uploads are not allowed from 127.0.0.3\r\n",
        )
        self.assertFalse(transport.connected)
        self.assertFalse((self.root / "new.bin").exists())
        self.assertEqual(self.leftovers(), [])
        protocol, transport = connect(factory, host="127.0.0.3")
        protocol.dataReceived(b"GET notes.txt\n")
        self.pump(transport)
        self.assertEqual(transport.value()[-12:], b"hello notes\n")
        protocol, transport = connect(factory, host="127.0.0.2")
        protocol.dataReceived(b"PUT new.bin 3\nabc")
        self.assertEqual((self.root / "new.bin").read_bytes(), b"abc")
        refusals = {
            labels["reason"]: value
            for name, _, labels, value in factory.metrics()
            if name == "file_upload_refusals_total"
        }
        self.assertEqual(refusals, {"acl": 1, "certificate": 0})

    def test_put_line_ended_by_half_close(self) -> None:
        """
        A PUT whose line ends with the client's input: the body can never
        come, so the upload is refused at once, not left to the idle timeout.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"PUT new.bin 5")
        self.assertEqual(transport.value(), b"")
        protocol.inputEnded()
        self.assertEqual(
            transport.value(),
            b"OK ready\r\nERR 400 connection ended in the middle of an upload\r\n",
        )
        self.assertEqual(protocol.phase, files.Phase.LOST)  # closed at once here
        self.assertEqual(self.leftovers(), [])
        self.assertFalse((self.root / "new.bin").exists())

    def test_phases_of_an_upload(self) -> None:
        """IDLE, UPLOADING while the body arrives, WORKING to commit, IDLE."""
        protocol, transport = self.connect()
        self.assertEqual(protocol.phase, files.Phase.IDLE)
        protocol.dataReceived(b"PUT new.bin 3\nab")
        self.assertEqual(protocol.phase, files.Phase.UPLOADING)
        protocol.dataReceived(b"c")
        # The commit ran at once here (no threads in a Clock): IDLE again.
        self.assertEqual(protocol.phase, files.Phase.IDLE)
        self.assertEqual((self.root / "new.bin").read_bytes(), b"abc")
        protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(protocol.phase, files.Phase.LOST)
        # Nothing leaves LOST: a late close is harmless, a new phase illegal.
        protocol.close()
        self.assertRaises(
            files.IllegalTransition, protocol._enter, files.Phase.STREAMING
        )

    def test_put_empty_and_subdir(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"PUT docs/e%20mpty 0\nLIST docs\n")
        self.clock.advance(0)
        self.assertIn(b"OK stored 0 sha256=", transport.value())
        self.assertIn(b" e%20mpty\r\n", transport.value())
        self.assertEqual((self.root / "docs" / "e mpty").read_bytes(), b"")

    def test_no_overwrite(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"PUT notes.txt 3\nabc")
        self.assertEqual(
            transport.value(), b"ERR 409 file exists and overwrite is off\r\n"
        )
        self.assertFalse(transport.connected)
        self.assertEqual((self.root / "notes.txt").read_bytes(), b"hello notes\n")

    def test_created_meanwhile(self) -> None:
        """A file appearing during the upload is not replaced either."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"PUT late.txt 3\n")
        (self.root / "late.txt").write_bytes(b"first")
        protocol.dataReceived(b"abc")
        self.assertEqual(transport.value(), b"OK ready\r\nERR 409 file exists\r\n")
        self.assertEqual((self.root / "late.txt").read_bytes(), b"first")
        self.assertEqual(self.leftovers(), [])

    def test_overwrite(self) -> None:
        factory = self.make(writable="true", overwrite="true")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"PUT notes.txt 3\nabc")
        self.assertIn(b"OK stored 3 ", transport.value())
        self.assertEqual((self.root / "notes.txt").read_bytes(), b"abc")

    def test_refusals(self) -> None:
        cases = [
            (b"PUT big 3000000", b"ERR 413 upload larger than 2097152 bytes"),
            (b"PUT ../x 1", b"ERR 403 path segments . and .. are not allowed"),
            (b"PUT .x 1", b"ERR 403 hidden: hidden files are not served"),
            (b"PUT docs 1", b"ERR 405 target exists and is not a regular file"),
            (b"PUT fifo 1", b"ERR 405 target exists and is not a regular file"),
            (b"PUT out/x 1", b"ERR 403 leads outside the root"),
            (b"PUT nodir/x 1", b"ERR 404 not found"),
            (b"PUT / 1", b"ERR 400 PUT needs a file name"),
            (b"PUT x", b"ERR 400 usage: PUT <path> <length>"),
        ]
        for request, answer in cases:
            protocol, transport = self.connect()
            protocol.dataReceived(request + b"\n")
            self.assertEqual(transport.value(), answer + b"\r\n", request)
            self.assertFalse(transport.connected)
        self.assertEqual(self.leftovers(), [])

    def test_free_space(self) -> None:
        real = os.fstatvfs

        def tiny(fd: int) -> Any:
            result = real(fd)
            return os.statvfs_result((*result[:4], 1, *result[5:]))

        self.patch(file_state.os, "fstatvfs", tiny)
        protocol, transport = self.connect()
        protocol.dataReceived(b"PUT x.bin 1000000\n")
        frsize = os.statvfs(self.root).f_frsize
        self.assertEqual(
            transport.value(),
            b"ERR 413 not enough free space (%d bytes available)\r\n" % frsize,
        )

    def test_free_space_promised_once(self) -> None:
        """
        Concurrent uploads are not all promised the same free space: what
        each has still to write is held back until it is stored or aborted.
        """
        real = os.fstatvfs

        def free(fd: int) -> Any:
            # 2.5 MB free, in 1-byte blocks, whatever is written.
            result = real(fd)
            return os.statvfs_result(
                (result[0], 1, result[2], result[3], 2_500_000, *result[5:])
            )

        self.patch(file_state.os, "fstatvfs", free)
        first, first_t = self.connect(port=40001)
        first.dataReceived(b"PUT a.bin 1000000\n")
        second, second_t = self.connect(port=40002)
        second.dataReceived(b"PUT b.bin 1000000\n")
        self.assertEqual([first_t.value(), second_t.value()], [b"OK ready\r\n"] * 2)
        refused = [b"ERR 413 not enough free space (500000 bytes available)\r\n"]
        third, third_t = self.connect(port=40003)
        third.dataReceived(b"PUT c.bin 1000000\n")
        self.assertEqual([third_t.value()], refused)
        # Bytes written are no longer promised (the disk has them).
        first.dataReceived(b"x" * 400_000)
        third, third_t = self.connect(port=40004)
        third.dataReceived(b"PUT c.bin 1000000\n")
        self.assertEqual(
            third_t.value(),
            b"ERR 413 not enough free space (900000 bytes available)\r\n",
        )
        second_t.loseConnection()  # aborted: its promise is released
        third, third_t = self.connect(port=40005)
        third.dataReceived(b"PUT c.bin 1000000\n")
        self.assertEqual(third_t.value(), b"OK ready\r\n")
        first.dataReceived(b"x" * 600_000)  # stored: released too
        self.assertIn(b"OK stored 1000000 ", first_t.value())
        self.assertEqual(len(self.factory.state.uploads), 1)
        third_t.loseConnection()
        self.assertEqual(self.factory.state.uploads, set())
        self.assertEqual(self.leftovers(), [])

    def test_timeout_removes_temporary_at_once(self) -> None:
        """
        An upload stalled past the idle timeout, from a client that does not
        read: the temporary file goes when the close begins, not when the
        connection is finally aborted (or never, if the daemon stops first).
        """
        factory = self.make(writable="true", idle_timeout="10")
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()  # loseConnection never completes
        protocol.makeConnection(transport)
        protocol.dataReceived(b"PUT stall.bin 1000000\n" + b"x" * 1000)
        self.assertEqual(len(self.leftovers()), 1)
        self.clock.advance(11)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.leftovers(), [])
        self.assertEqual(factory.state.uploads, set())
        protocol.connectionLost(Failure(Exception("aborted")))  # harmless later
        self.assertEqual(self.leftovers(), [])

    def test_failed_commit_removes_temporary(self) -> None:
        """
        A commit failing in its thread removes the temporary file itself: if
        the daemon is stopping, no callback may run on the reactor after it.
        """

        def broken(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        state = self.factory.state
        upload = state.begin_upload(b"docs/c.bin", 3, Peer("127.0.0.1"))
        upload.feed(b"abc")
        self.patch(file_state.os, "fsync", broken)
        self.assertRaises(OSError, upload.commit)
        self.assertEqual(self.leftovers(self.root / "docs"), [])
        self.assertFalse((self.root / "docs" / "c.bin").exists())
        self.assertEqual((upload.fd, upload.dir_fd), (-1, -1))
        upload.abort()  # the reactor's error path after it: harmless

    def test_reload_during_upload(self) -> None:
        """A reload to another root: the upload ends where it began."""
        second = self.base / "second"
        second.mkdir()
        protocol, transport = self.connect()
        protocol.dataReceived(b"PUT r.bin 6\nabc")
        cut, cut_t = self.connect(port=40001)
        cut.dataReceived(b"PUT cut.bin 6\nabc")
        new = settings(
            file={
                "root": str(second),
                "enabled": "true",
                "writable": "1",
                "upload_allow": "127.0.0.1",
            }
        )
        self.factory.reconfigure(new)
        self.addCleanup(self.factory.state.root.close)
        protocol.dataReceived(b"def")
        cut_t.loseConnection()
        self.assertIn(b"OK stored 6 ", transport.value())
        self.assertEqual((self.root / "r.bin").read_bytes(), b"abcdef")
        self.assertEqual(self.leftovers() + self.leftovers(second), [])
        self.assertEqual(os.listdir(second), [])

    def test_cut_midway(self) -> None:
        """A dropped connection leaves neither the file nor a temporary."""
        for cut in ("lost", "eof"):
            protocol, transport = self.connect()
            protocol.dataReceived(b"PUT cut.bin %d\n" % len(BODY) + BODY[:5000])
            self.assertEqual(len(self.leftovers()), 1)
            if cut == "lost":
                transport.loseConnection()
            else:
                protocol.readConnectionLost()
            self.assertFalse((self.root / "cut.bin").exists())
            self.assertEqual(self.leftovers(), [])
            self.assertFalse(transport.connected)

    def test_disk_full(self) -> None:
        real = os.write
        written = []

        def full(fd: int, data: Any) -> int:
            if written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written.append(len(data))
            return real(fd, data)

        protocol, transport = self.connect()
        protocol.dataReceived(b"PUT full.bin %d\n" % len(BODY))
        self.patch(file_state.os, "write", full)
        protocol.dataReceived(BODY[:1000])
        protocol.dataReceived(BODY[1000:2000])
        self.assertEqual(
            transport.value(),
            b"OK ready\r\nERR 413 cannot write: No space left on device\r\n",
        )
        self.assertFalse((self.root / "full.bin").exists())
        self.assertEqual(self.leftovers(), [])

    def test_upload_in_progress_invisible(self) -> None:
        """Even with hidden files served, a temporary upload is not."""
        factory = self.make(writable="true", hidden="true")
        uploader, _ = self.connect(factory)
        uploader.dataReceived(b"PUT p.bin 10\nabc")
        (temp,) = self.leftovers()
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"GET %s\nLIST\n" % temp.encode())
        self.clock.advance(0)
        self.assertTrue(transport.value().startswith(b"ERR 404 not found\r\nOK\r\n"))
        self.assertNotIn(b"sockd-upload", transport.value())

    def test_reserved_name(self) -> None:
        protocol, transport = self.connect(self.make(writable="true", hidden="true"))
        protocol.dataReceived(b"PUT .sockd-upload.x 1\n")
        self.assertEqual(transport.value(), b"ERR 403 reserved name\r\n")


class LinkPolicyTests(Base):
    """
    The hidden and reserved name rules hold for the names a symlink inside
    the root leads through, on every command; and the hard-link policy.
    """

    def setUp(self) -> None:
        super().setUp()
        (self.root / ".git").mkdir()
        (self.root / ".git" / "config").write_bytes(CANARY)
        (self.root / ".hidden").write_bytes(CANARY)
        (self.root / ".private").mkdir()
        os.symlink(".hidden", self.root / "vis.txt")
        os.symlink(".git", self.root / "gitlink")
        os.symlink(".private", self.root / "pub")
        os.symlink("notes.txt", self.root / "plain_link")

    def test_every_command_refuses(self) -> None:
        protocol, transport = self.connect()
        hidden = b"ERR 403 hidden: hidden files are not served\r\n"
        for request in (
            b"GET vis.txt",
            b"GET gitlink/config",
            b"STAT vis.txt",
            b"STAT gitlink",
            b"STAT gitlink/config",
            b"SUM vis.txt",
            b"SUM gitlink/config",
            b"LIST gitlink",
        ):
            transport.clear()
            protocol.dataReceived(request + b"\n")
            self.clock.advance(0)
            self.assertEqual(transport.value(), hidden, request)
        transport.clear()
        protocol.dataReceived(b"GET plain_link\n")
        self.pump(transport)
        self.assertTrue(transport.value().endswith(b"\r\nhello notes\n"))

    def test_bare_and_menu(self) -> None:
        factory = self.make(bare_errors="line")
        for request in (b"vis.txt\n", b"/gitlink/config\n", b"gitlink\n"):
            self.assertEqual(
                self.exchange(request, factory),
                b"ERR 403 hidden: hidden files are not served\r\n",
            )
        self.assertEqual(
            self.exchange(b"/gitlink/config\r\n", factory),
            b"3403 hidden files are not served\t\terror.host\t1\r\n.\r\n",
        )
        menu = self.exchange(b"\r\n", factory)
        self.assertIn(b"0plain_link\t/plain_link\t", menu)  # text, sniffed
        self.assertNotIn(b"vis.txt", menu)
        self.assertNotIn(b"gitlink", menu)
        self.assertNotIn(CANARY, menu)

    def test_listing_leaves_them_out(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"LIST\n")
        self.clock.advance(0)  # listings are produced from the next turn on
        names = [line.split(b" ")[-1] for line in transport.value().split(b"\r\n")]
        self.assertIn(b"plain_link", names)
        for name in (b"vis.txt", b"gitlink", b"pub"):
            self.assertNotIn(name, names)

    def test_served_when_hidden_names_are(self) -> None:
        factory = self.make(hidden="true", bare_errors="line")
        self.assertEqual(self.exchange(b"vis.txt\n", factory), CANARY)
        self.assertEqual(self.exchange(b"gitlink/config\n", factory), CANARY)

    def test_link_to_an_upload_in_progress(self) -> None:
        """Never served, listed or uploaded through, even with hidden names on."""
        for hidden in ("false", "true"):
            factory = self.make(writable="true", hidden=hidden, bare_errors="line")
            uploader, _ = self.connect(factory)
            uploader.dataReceived(b"PUT p.bin 10\nabc")
            (temp,) = [n for n in os.listdir(self.root) if ".sockd-upload." in n]
            os.symlink(temp, self.root / "peek")
            os.symlink(".", self.root / "here")
            protocol, transport = self.connect(factory)
            protocol.dataReceived(b"GET peek\nSTAT here/peek\nLIST\n")
            self.clock.advance(0)
            value = transport.value()
            self.assertTrue(
                value.startswith(b"ERR 404 not found\r\nERR 404 not found\r\nOK\r\n"),
                value,
            )
            self.assertNotIn(b"peek", value)
            # A hidden name too, unless hidden names are served.
            reason = b"reserved name" if hidden == "true" else b"hidden: hidden files"
            self.assertIn(
                b"ERR 403 " + reason,
                self.exchange(b"PUT here/%s 1\nx" % temp.encode(), factory),
            )
            self.assertEqual(
                self.exchange(b"peek\n", factory), b"ERR 404 not found\r\n"
            )
            uploader.transport.loseConnection()  # type: ignore[union-attr]
            os.unlink(self.root / "peek")
            os.unlink(self.root / "here")

    def test_put_through_a_link_to_a_hidden_directory(self) -> None:
        factory = self.make(writable="true")
        for request in (b"PUT pub/x.bin 3\nabc", b"PUT gitlink/hooks 3\nabc"):
            self.assertEqual(
                self.exchange(request, factory),
                b"ERR 403 hidden: hidden files are not served\r\n",
            )
        self.assertEqual(os.listdir(self.root / ".private"), [])
        self.assertEqual(os.listdir(self.root / ".git"), ["config"])
        self.assertEqual(factory.state.uploads, set())

    def test_hardlinks(self) -> None:
        os.link(self.root / "notes.txt", self.root / "twin.txt")
        refuse = self.make(hardlinks="refuse", bare_errors="line")
        protocol, transport = self.connect(refuse)
        protocol.dataReceived(b"GET twin.txt\nSTAT notes.txt\nSUM plain_link\nLIST\n")
        self.clock.advance(0)
        lines = transport.value().split(b"\r\n")
        refused = b"ERR 403 a file with more than one hard link is not served"
        self.assertEqual(lines[:3], [refused] * 3)
        self.assertNotIn(b"twin.txt", transport.value())
        self.assertNotIn(b"notes.txt", transport.value())
        self.assertIn(b"big.bin", transport.value())
        self.assertEqual(self.exchange(b"twin.txt\n", refuse), refused + b"\r\n")
        # allow, the default: served by either name
        self.assertEqual(self.exchange(b"twin.txt\n"), b"hello notes\n")


class GopherTests(Base):
    """
    Requests as Gopher clients send them: error items, the advertised
    address, item types by content, and gophermaps.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def menu(self, request: bytes, factory: FileFactory | None = None) -> list[bytes]:
        """A menu's lines, without the final C{.}; the connection is closed."""
        protocol, transport = self.connect(factory)
        protocol.dataReceived(request)
        for _ in range(1000):
            if not transport.connected:
                break
            turn(self.clock)
        value = bytes(transport.value())
        self.assertTrue(value.endswith(b".\r\n"), value)
        self.assertFalse(transport.connected)
        return value.split(b"\r\n")[:-2]

    def logged(self, text: str) -> list[str]:
        return [formatEvent(e) for e in self.events if text in e.get("log_format", "")]

    def test_errors_are_items(self) -> None:
        cases = {
            b"/missing.txt": b"404 not found",
            b"/../canary": b"403 path segments . and .. are not allowed",
            b"/out": b"403 leads outside the root",
            b"/.hidden": b"403 hidden files are not served",
            b"/fifo": b"405 not a regular file",
            b"/a\\b": b"400 backslash in path; use / between names",
        }
        for selector, text in cases.items():
            for end in (b"\r\n", b"\t+\r\n", b"\t\n"):
                for factory in (self.factory, self.make(bare_errors="line")):
                    protocol, transport = self.connect(factory)
                    protocol.dataReceived(selector + end)
                    self.assertEqual(
                        transport.value(),
                        b"3" + text + b"\t\terror.host\t1\r\n.\r\n",
                        selector + end,
                    )
                    self.assertFalse(transport.connected)
            # netcat's LF keeps the old answers (test_errors_close_silently too).
            self.assertEqual(self.exchange(selector + b"\n"), b"")
        self.assertEqual(self.factory.state.refused[404], 4)

    def test_menus_advertise_the_connected_address(self) -> None:
        lines = self.menu(b"/docs\r\n")
        self.assertEqual(lines, [b"0README.txt\t/docs/README.txt\t127.0.0.1\t9000"])
        protocol, transport = self.connect()
        transport.hostAddr = IPv6Address("TCP", "::ffff:192.0.2.1", 7070)
        protocol.dataReceived(b"/docs\r\n")
        self.clock.advance(0)
        self.assertEqual(
            transport.value(),
            b"0README.txt\t/docs/README.txt\t192.0.2.1\t7070\r\n.\r\n",
        )

    def test_gopher_host_and_port_and_reload(self) -> None:
        factory = self.make(gopher_host="gopher.example.org", gopher_port="70")
        self.assertEqual(
            self.menu(b"/docs\r\n", factory),
            [b"0README.txt\t/docs/README.txt\tgopher.example.org\t70"],
        )
        keys = {"root": str(self.root), "enabled": "true"}
        factory.reconfigure(settings(file={**keys, "gopher_host": "10.1.2.3"}))
        self.assertEqual(
            self.menu(b"/docs\r\n", factory),
            [b"0README.txt\t/docs/README.txt\t10.1.2.3\t9000"],
        )
        factory.reconfigure(settings(file=keys))
        self.addCleanup(factory.state.root.close)
        self.assertEqual(
            self.menu(b"/docs\r\n", factory),
            [b"0README.txt\t/docs/README.txt\t127.0.0.1\t9000"],
        )

    def test_behind_a_proxy_the_header_names_the_address(self) -> None:
        """With a PROXY header, the address the client reached the proxy at."""
        self.factory.set_access(
            AccessList(), AccessList(config.networks("10.0.0.5/32", self.root))
        )
        proxied = ProxyHeaderFactory(self.factory)
        addr = IPv4Address("TCP", "10.0.0.5", 50000)
        protocol = proxied.buildProtocol(addr)
        transport = StringTransportWithDisconnection(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 9000), peerAddress=addr
        )
        transport.protocol = protocol
        protocol.makeConnection(transport)
        protocol.dataReceived(
            b"PROXY TCP4 192.0.2.7 203.0.113.5 40001 7070\r\n/docs\r\n"
        )
        self.clock.advance(0)
        self.assertEqual(
            transport.value(),
            b"0README.txt\t/docs/README.txt\t203.0.113.5\t7070\r\n.\r\n",
        )

    def test_item_types_by_content(self) -> None:
        kinds = self.root / "kinds"
        kinds.mkdir()
        for name, data in {
            "a.png": b"x",
            "b.gif": b"x",
            "c.html": b"<p>",
            "d.mp3": b"x",
            "e.tar.gz": b"x",
            "f.txt": b"\x00binary after all",  # the name decides
            "Makefile": b"all:\n\ttrue\n",
            "blob": bytes(range(256)),
            "sub": None,
        }.items():
            if data is None:
                (kinds / name).mkdir()
            else:
                (kinds / name).write_bytes(data)
        self.assertEqual(
            [line.split(b"\t")[0] for line in self.menu(b"/kinds\r\n")],
            [
                *(b"0Makefile", b"Ia.png", b"gb.gif", b"9blob", b"hc.html"),
                *(b"sd.mp3", b"5e.tar.gz", b"0f.txt", b"1sub"),
            ],
        )
        # An HTML item is a file of this server: its selector, no URL: link.
        self.assertIn(
            b"hc.html\t/kinds/c.html\t127.0.0.1\t9000", self.menu(b"/kinds\r\n")
        )

    # --- gophermaps -----------------------------------------------------------

    def test_map_shapes_the_menu(self) -> None:
        (self.root / "docs" / "more.txt").write_bytes(b"more\n")
        (self.root / "docs" / "gophermap").write_bytes(
            b"The docs.\n"
            b"\n"
            b"0Start here\tREADME.txt\n"
            b"1Back to the top\t/\n"
            b"9Big file, from the root\t/big.bin\n"
            b"1Elsewhere\t/\tgopher.floodgap.com\t70\n"
            b"*\n"
        )
        factory = self.make(gophermap="true")
        self.assertEqual(
            self.menu(b"/docs\r\n", factory),
            [
                b"iThe docs.\t\t127.0.0.1\t9000",
                b"i\t\t127.0.0.1\t9000",
                b"0Start here\t/docs/README.txt\t127.0.0.1\t9000",
                b"1Back to the top\t/\t127.0.0.1\t9000",
                b"9Big file, from the root\t/big.bin\t127.0.0.1\t9000",
                b"1Elsewhere\t/\tgopher.floodgap.com\t70",
                # The rest: not README.txt (listed), not the map itself.
                b"0more.txt\t/docs/more.txt\t127.0.0.1\t9000",
            ],
        )
        # Off (the default): the map is a file like any other.
        self.assertEqual(
            self.menu(b"/docs\r\n"),
            [
                b"0README.txt\t/docs/README.txt\t127.0.0.1\t9000",
                b"0gophermap\t/docs/gophermap\t127.0.0.1\t9000",
                b"0more.txt\t/docs/more.txt\t127.0.0.1\t9000",
            ],
        )
        # Without a star, the map is the whole menu.
        (self.root / "docs" / "gophermap").write_bytes(b"0Only\tmore.txt\n")
        self.assertEqual(
            self.menu(b"/docs\r\n", factory),
            [b"0Only\t/docs/more.txt\t127.0.0.1\t9000"],
        )

    def test_map_cannot_leave_the_root_or_reach_hidden_names(self) -> None:
        (self.root / "gophermap").write_bytes(
            b"0Canary\t../canary\n"
            b"0Canary\t/../canary\n"
            b"0Through a link\tout\n"
            b"0Hidden\t.hidden\n"
            b"0Absolute\t/etc/passwd\n"
            b"0A FIFO\tfifo\n"
            b"0Missing\tnope.txt\n"
            b"3Fake error\t\terror.host\t1\n"
            b"=cat /etc/passwd\n"
            b"1The docs\tdocs\n"
        )
        lines = self.menu(b"\r\n", self.make(gophermap="true"))
        self.assertEqual(lines, [b"1The docs\t/docs\t127.0.0.1\t9000"])
        (line,) = self.logged("gophermap of")
        self.assertIn("9 line(s) left out", line)
        self.assertIn("never run", line)  # the first three reasons
        # A map that is itself a link out of the root is not read.
        (self.root / "docs" / "gophermap").symlink_to("../../canary")
        lines = self.menu(b"/docs\r\n", self.make(gophermap="true"))
        self.assertEqual(lines, [b"0README.txt\t/docs/README.txt\t127.0.0.1\t9000"])
        self.assertEqual(
            self.logged("ignored"),
            ["file: /docs/gophermap ignored: leads outside the root"],
        )

    def test_a_map_too_large_is_ignored(self) -> None:
        (self.root / "docs" / "gophermap").write_bytes(b"x" * (64 * 1024 + 1))
        lines = self.menu(b"/docs\r\n", self.make(gophermap="true"))
        self.assertEqual(lines, [b"0README.txt\t/docs/README.txt\t127.0.0.1\t9000"])
        self.assertEqual(
            self.logged("ignored"),
            ["file: /docs/gophermap ignored: larger than 65536 bytes"],
        )

    def test_a_long_map_is_resolved_in_slices(self) -> None:
        many = self.root / "many"
        many.mkdir()
        count = 3 * file_state.SCAN_ENTRIES
        for n in range(count):
            (many / f"n{n:04d}.txt").write_bytes(b"x")
        (many / "gophermap").write_bytes(
            b"".join(b"0Item %d\tn%04d.txt\n" % (n, n) for n in range(count))
        )
        protocol, transport = self.connect(self.make(gophermap="true"))
        protocol.dataReceived(b"/many\r\n")
        written = []
        for _ in range(100):
            if not transport.connected:
                break
            before = len(transport.value())
            turn(self.clock)
            written.append(len(transport.value()) - before)
        lines = transport.value().split(b"\r\n")
        self.assertEqual(len(lines), count + 2)
        self.assertEqual(lines[5], b"0Item 5\t/many/n0005.txt\t127.0.0.1\t9000")
        self.assertGreaterEqual(len([w for w in written if w]), 3)
        longest = max(len(line) + 2 for line in lines)
        self.assertLessEqual(max(written), file_state.SCAN_ENTRIES * longest + 3)

    def test_maps_are_not_uploaded(self) -> None:
        factory = self.make(writable="true", gophermap="true")
        self.assertEqual(
            self.exchange(b"PUT docs/gophermap 3\nabc", factory),
            b"ERR 403 gophermaps are not accepted as uploads\r\n",
        )
        self.assertFalse((self.root / "docs" / "gophermap").exists())
        factory = self.make(writable="true")
        self.assertTrue(
            self.exchange(b"PUT docs/gophermap 3\nabc", factory).startswith(
                b"OK ready\r\nOK stored 3 "
            )
        )


class ConnectionLineTests(Base):
    """One log line per connection, at its end, with what it moved."""

    def lines(self, data: bytes) -> tuple[list[dict[str, Any]], bytes]:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        protocol, transport = self.connect()
        protocol.dataReceived(data)
        self.pump(transport)
        self.pump(transport)
        self.assertFalse(transport.connected)
        ours = [e for e in events if e["log_namespace"].startswith("sockd")]
        return ours, bytes(transport.value())

    def test_framed(self) -> None:
        request = b"STAT docs\nGET big.bin\nGET notes.txt 6\nQUIT\n"
        (line,), sent = self.lines(request)
        self.assertEqual(line["event"], "connection")
        self.assertEqual(
            (line["bytes_in"], line["bytes_out"]), (len(request), len(sent))
        )
        self.assertGreater(len(sent), len(BODY))
        self.assertEqual((line["requests"], line["request"]), (2, "GET notes.txt"))

    def test_bare(self) -> None:
        (line,), sent = self.lines(b"with space%.txt\n")
        self.assertEqual(sent, b"spaced\n")
        self.assertEqual((line["bytes_in"], line["bytes_out"]), (16, 7))
        self.assertEqual(line["request"], "bare with space%.txt")


class SweepTests(Base):
    """The start-up sweep of temporary files that crashed uploads left."""

    STALE = ".sockd-upload.0123456789abcdef"

    def setUp(self) -> None:
        super().setUp()
        self.clock.advance(time.time())  # mtimes are wall-clock times
        self.old = time.time() - 3600

    def plant(self, path: Path, data: bytes = b"partial", old: bool = True) -> Path:
        path.write_bytes(data)
        if old:
            os.utime(path, (self.old, self.old))
        return path

    def swept(self, events: Any) -> list[tuple[int, int, int]]:
        return [
            (e["removed"], e["size"], e["kept"])
            for e in events
            if "stale upload" in e.get("log_format", "")
        ]

    def test_only_stale_temporaries_anywhere(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        (self.root / "docs" / "deep").mkdir()
        (self.root / ".cache").mkdir()
        stale = [
            self.plant(self.root / self.STALE, b"12345"),
            self.plant(self.root / "docs" / ".sockd-upload.00000000000000ff", b"1"),
            self.plant(self.root / "docs" / "deep" / ".sockd-upload.ffffffffffffffff"),
            self.plant(self.root / ".cache" / ".sockd-upload.0000000000000000", b""),
        ]
        kept = [
            # recent: maybe another process's upload between writes
            self.plant(self.root / ".sockd-upload.1111111111111111", old=False),
            # locked below: another process's upload, silent for an hour
            self.plant(self.root / "docs" / ".sockd-upload.2222222222222222"),
        ]
        others = [
            self.plant(self.root / ".sockd-upload.notes"),
            self.plant(self.root / ".sockd-upload.0123456789ABCDEF"),
            self.plant(self.root / "x.sockd-upload.0123456789abcdef"),
            self.plant(self.root / ".sockd-upload.0123456789abcdef0"),
        ]
        (self.root / ".sockd-upload.3333333333333333").mkdir()
        link = self.root / "docs" / ".sockd-upload.4444444444444444"
        os.symlink("../../canary", link)
        os.utime(link, (self.old, self.old), follow_symlinks=False)
        holder = os.open(kept[1], os.O_RDONLY)
        self.addCleanup(os.close, holder)
        fcntl.flock(holder, fcntl.LOCK_EX)
        factory = self.make(writable="true")
        self.successResultOf(factory.state.sweep())
        self.assertEqual([p for p in stale if p.exists()], [])
        self.assertEqual([p for p in kept + others if not p.exists()], [])
        self.assertTrue(link.is_symlink())
        self.assertTrue((self.root / ".sockd-upload.3333333333333333").is_dir())
        self.assertEqual((self.base / "canary").read_bytes(), CANARY)
        self.assertEqual(self.swept(events), [(4, 5 + 1 + 7 + 0, 3)])

    def test_running_upload_is_kept(self) -> None:
        """Its own upload, silent longer than the window: its lock keeps it."""
        factory = self.make(writable="true")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"PUT live.bin 6\nabc")
        (temp,) = [n for n in os.listdir(self.root) if n.startswith(".sockd-upload.")]
        os.utime(self.root / temp, (self.old, self.old))
        self.successResultOf(factory.state.sweep())
        self.assertTrue((self.root / temp).exists())
        protocol.dataReceived(b"def")
        self.assertIn(b"OK stored 6 ", transport.value())
        self.assertEqual((self.root / "live.bin").read_bytes(), b"abcdef")

    def test_at_start_when_writable(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        stale = self.plant(self.root / self.STALE)
        read_only = self.make()
        read_only.doStart()
        read_only.doStop()
        self.assertTrue(stale.exists())  # a read-only server deletes nothing
        writable = self.make(writable="true")
        writable.doStart()
        self.assertFalse(stale.exists())
        self.assertEqual(self.swept(events), [(1, 7, 0)])
        writable.doStop()
        self.plant(self.root / self.STALE)
        self.successResultOf(writable.state.sweep())  # stopped: no more sweeps
        self.assertTrue(stale.exists())

    def test_reload_sweeps_a_new_root(self) -> None:
        second = self.base / "second"
        second.mkdir()
        stale = self.plant(second / self.STALE)
        new = settings(
            file={
                "root": str(second),
                "enabled": "true",
                "writable": "1",
                "upload_allow": "127.0.0.1",
            }
        )
        self.factory.reconfigure(new)
        self.addCleanup(self.factory.state.root.close)
        self.assertFalse(stale.exists())

    def test_stops_when_told(self) -> None:
        stale = self.plant(self.root / "docs" / self.STALE)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        self.assertEqual(sweep_uploads(fd, time.time(), lambda: True), (0, 0, 0))
        self.assertTrue(stale.exists())
        self.assertEqual(sweep_uploads(fd, time.time()), (1, 7, 0))


class HelpersTests(SynchronousTestCase):
    def test_percent(self) -> None:
        name = "a b%c\u00e9\t.txt".encode()
        encoded = percent_encode(name)
        self.assertEqual(encoded, b"a%20b%25c%C3%A9%09.txt")
        self.assertEqual(percent_decode(encoded), name)
        self.assertEqual(percent_decode(b"%2f"), b"/")
        self.assertRaises(PathError, percent_decode, b"%2")
        self.assertRaises(PathError, percent_decode, b"%g0")


class Reader(Protocol):
    def __init__(self) -> None:
        self.received = 0
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > 100 * 1024 and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_descriptors_back_to_baseline(tmp_path: Path) -> None:
    """
    100 transfers aborted by the client over loopback, real reactor (under
    pytest-twisted): every descriptor is closed, every slot released.
    """
    root = make_tree(tmp_path)
    (root / "large.bin").write_bytes(BODY * 8)
    config_ = settings(file={"root": str(root), "enabled": "true"})
    state = FileState(config_.file, reactor)
    factory = FileFactory(state, reactor, abort_grace=5)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

    async def one(request: bytes) -> None:
        reader = Reader()
        await connectProtocol(endpoint, reader).addTimeout(10, reactor)
        reader.transport.write(request)  # type: ignore[union-attr]
        await reader.lost.addTimeout(10, reactor)

    async def settled() -> None:
        # The server notices each abort on one of its next turns.
        for _ in range(500):
            if factory.limiter.total == 0:
                return
            wait: Deferred[None] = Deferred()
            reactor.callLater(0.01, wait.callback, None)
            await wait
        raise AssertionError("server connections did not close")

    try:
        await one(b"large.bin\n")
        await settled()
        before = len(os.listdir("/proc/self/fd"))
        for i in range(100):
            await one(b"large.bin\n" if i % 2 else b"GET large.bin\n")
        await settled()
        assert len(os.listdir("/proc/self/fd")) == before
        # Still serving.
        collector = Collector()
        await connectProtocol(endpoint, collector)
        collector.transport.write(b"notes.txt\n")  # type: ignore[union-attr]
        assert await collector.lost.addTimeout(10, reactor) == b"hello notes\n"
    finally:
        await port.stopListening()
        state.root.close()


class Collector(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(b"".join(self.chunks))


class TapTests(SynchronousTestCase):
    """C{twistd sockd-file} options, and the [file] part of C{twistd sockd}."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir()
        self.root = make_tree(self.base)
        self.ini = self.base / "sockd.ini"
        self.ini.write_text(
            "[echo]\nenabled = false\n[file]\nroot = files\nupload_allow = 127.0.0.1\n"
        )

    def test_options_map_to_keys(self) -> None:
        options = file_tap.Options()
        options.parseOptions(
            [
                "--config",
                str(self.ini),
                "--listen",
                "tcp:8123:interface=127.0.0.1",
                "--listen",
                "tcp:8124:interface=127.0.0.1",
                "--writable",
                "--hidden",
                "--symlinks",
                "refuse",
                "--hardlinks",
                "refuse",
                "--max-upload",
                "1M",
                "--rate-limit",
                "64K",
            ]
        )
        settings_ = options.config.file
        self.assertTrue(settings_.enabled)
        self.assertEqual(settings_.root, self.root)  # relative to the INI file
        self.assertEqual(len(settings_.listen), 2)
        self.assertEqual(
            (settings_.writable, settings_.hidden, settings_.overwrite),
            (True, True, False),
        )
        self.assertEqual(settings_.symlinks, "refuse")
        self.assertEqual(settings_.hardlinks, "refuse")
        self.assertEqual(settings_.max_upload, 1024 * 1024)
        self.assertEqual(settings_.rate_limit, 64 * 1024)
        reactor = MemoryReactor()
        service = file_tap.makeService(options, reactor=reactor)
        service.privilegedStartService()
        service.startService()
        ports = [(p[0], p[3]) for p in reactor.tcpServers]
        self.assertEqual(ports, [(8123, "127.0.0.1"), (8124, "127.0.0.1")])
        factory = reactor.tcpServers[0][1]
        self.assertIsInstance(factory, FileFactory)
        self.assertEqual(factory.state.root.hardlinks, "refuse")
        self.assertEqual(factory.refusal("busy"), b"ERR 429 busy\r\n")
        service.stopService()
        factory.state.root.close()

    def test_hardlinks_key(self) -> None:
        self.assertEqual(settings().file.hardlinks, "allow")
        with self.assertRaises(config.ConfigError) as caught:
            settings(file={"hardlinks": "sometimes"})
        self.assertIn("hardlinks", str(caught.exception))
        self.assertIn("allow, refuse", str(caught.exception))

    def test_missing_root_names_the_key(self) -> None:
        options = file_tap.Options()
        with self.assertRaises((usage.UsageError, SystemExit)) as caught:
            options.parseOptions(
                ["--config", str(self.ini), "--root", str(self.base / "nope")]
            )
        error = caught.exception
        message = str(error.code if isinstance(error, SystemExit) else error)
        self.assertIn("[file] root", message)
        self.assertIn("is not an existing directory", message)

    def test_all_in_one(self) -> None:
        self.ini.write_text(
            "[echo]\nenabled = false\n[file]\nenabled = true\nroot = files\n"
            "listen = tcp:8125:interface=127.0.0.1\n"
        )
        options = tap.Options()
        options.parseOptions(["--config", str(self.ini)])
        self.assertEqual(options.enabled_sections(), ["file"])
        reactor = MemoryReactor()
        service = tap.makeService(options, reactor=reactor)
        service.privilegedStartService()
        self.assertEqual(reactor.tcpServers[0][0], 8125)
        reactor.tcpServers[0][1].state.root.close()

    def test_packaged_default_serves_sample_files(self) -> None:
        default = config.load(str(config.packaged_default()))
        self.assertTrue(default.file.enabled)
        assert default.file.root is not None
        self.assertTrue((default.file.root / "hello.txt").is_file())
        self.assertEqual(default.file.listen, ("tcp:8898:interface=127.0.0.1",))


@pytest_twisted.ensureDeferred
async def test_tls_pipelined(tmp_path: Path) -> None:
    """Under TLS (the chunk fallback): two GETs and a QUIT on one connection."""
    from tests.files.test_sendfile import self_signed_pem

    root = make_tree(tmp_path)
    config_ = settings(file={"root": str(root), "enabled": "true"})
    state = FileState(config_.file, reactor)
    factory = FileFactory(state, reactor, abort_grace=5)
    certificate = ssl.PrivateCertificate.loadPEM(self_signed_pem())
    port = reactor.listenSSL(0, factory, certificate.options(), interface="127.0.0.1")
    try:
        endpoint = wrapClientTLS(
            ssl.CertificateOptions(verify=False),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        collector = Collector()
        await connectProtocol(endpoint, collector).addTimeout(10, reactor)
        collector.transport.write(  # type: ignore[union-attr]
            b"GET big.bin\nGET notes.txt\nQUIT\n"
        )
        data = await collector.lost.addTimeout(10, reactor)
    finally:
        await port.stopListening()
        state.root.close()
    header, _, rest = data.partition(b"\r\n")
    assert header.startswith(b"OK %d " % len(BODY))
    assert rest[: len(BODY)] == BODY
    assert rest[len(BODY) :].endswith(b"\r\nhello notes\nOK bye\r\n")


def test_phase_transitions_outside_the_table_raise() -> None:
    """Every phase pair not in L{files.TRANSITIONS} is refused, and nothing else."""
    for start in files.Phase:
        for goal in files.Phase:
            protocol = files.FileProtocol()
            protocol.phase = start
            if goal in files.TRANSITIONS[start]:
                protocol._enter(goal)
                assert protocol.phase is goal
            else:
                with pytest.raises(files.IllegalTransition):
                    protocol._enter(goal)
                assert protocol.phase is start
    assert files.TRANSITIONS[files.Phase.LOST] == {files.Phase.LOST}


class AccessTests(Base):
    def test_reload_applies_at_the_next_request(self) -> None:
        """An access list changed on reload refuses an open connection next time."""
        from sockd.core.config import networks
        from sockd.core.limits import AccessList

        factory = self.make()
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"STAT notes.txt\n")
        self.assertTrue(transport.value().startswith(b"OK "))
        transport.clear()
        factory.set_access(
            AccessList(deny=networks("127.0.0.0/24", self.root)), AccessList()
        )
        protocol.dataReceived(b"STAT notes.txt\n")
        self.assertEqual(transport.value(), b"ERR 403 access denied\r\n")
        self.assertEqual(factory.limiter.refused_by["acl"], 1)
