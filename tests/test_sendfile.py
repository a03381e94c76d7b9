"""
Tests for L{sockd.sendfile}: over real loopback connections under the real
reactor (sendfile, the chunk fallback, TLS), and in memory for pacing.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sockd import sendfile
from sockd.sendfile import (
    Bucket,
    ChunkProducer,
    Pacer,
    SendfileProducer,
    TransferError,
    can_sendfile,
    send_file,
)

reactor: Any = _reactor


def self_signed_pem() -> str:
    """A throwaway key and self-signed certificate, PEM, for a TLS server."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return (key_pem + cert.public_bytes(serialization.Encoding.PEM)).decode()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def pattern(size: int) -> bytes:
    block = bytes(range(256)) * 4096  # 1 MiB, so offsets are checkable
    return (block * (size // len(block) + 1))[:size]


class Server(Protocol):
    """Writes a header, then sends a file with L{send_file}, then closes."""

    def __init__(
        self,
        path: Path,
        length: int | None = None,
        offset: int = 0,
        use_sendfile: bool = True,
        progress: Callable[[Server, int], None] | None = None,
    ) -> None:
        self.path = path
        self.offset = offset
        self.length = length
        self.use_sendfile = use_sendfile
        self.on_progress = progress
        self.done: Deferred[Any] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.producer: Any = None
        self.producer_at_close: object = "unset"
        self.sent = 0

    def connectionMade(self) -> None:
        assert self.transport is not None
        fd = os.open(self.path, os.O_RDONLY)
        length = self.length
        if length is None:
            length = os.fstat(fd).st_size - self.offset
        self.transport.write(b"HEADER %d\r\n" % length)
        self.producer, result = send_file(
            self.transport,
            fd,
            self.offset,
            length,
            reactor,
            progress=self._progress,
            use_sendfile=self.use_sendfile,
        )
        result.addBoth(self._finished)

    def _progress(self, count: int) -> None:
        self.sent += count
        if self.on_progress is not None:
            self.on_progress(self, count)

    def _finished(self, result: Any) -> None:
        transport: Any = self.transport
        self.producer_at_close = getattr(transport, "producer", None)
        transport.loseConnection()
        self.done.callback(result)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class Client(Protocol):
    def __init__(self, pause_after: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.received = 0
        self.pause_after = pause_after
        self.lost: Deferred[bytes] = Deferred()
        self.on_data: Callable[[Client], None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.received += len(data)
        if self.on_data is not None:
            self.on_data(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(b"".join(self.chunks))


def split_header(data: bytes) -> tuple[bytes, bytes]:
    header, _, body = data.partition(b"\r\n")
    return header, body


class RealConnectionTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def file(self, size: int, name: str = "f.bin") -> Path:
        path = self.dir / name
        path.write_bytes(pattern(size))
        return path

    async def baseline(self) -> int:
        """The descriptor count once the reactor has made its own (a first
        run opens a few) and one small transfer has come and gone."""
        await self.exchange(Server(self.file(10, "warm.bin")))
        return open_fds()

    async def exchange(
        self, server: Server, client: Client | None = None
    ) -> tuple[bytes, Any, Client]:
        factory = Factory.forProtocol(lambda: server)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        client = client or Client()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await connectProtocol(endpoint, client)
        data = await client.lost
        try:
            result = await server.done
        except TransferError as e:
            result = e
        await server.closed
        await port.stopListening()
        return data, result, client

    async def test_sendfile_whole(self) -> None:
        """A 20 MiB file, header first, byte for byte, fd closed after."""
        path = self.file(20 * 1024 * 1024 + 7)
        before = await self.baseline()
        server = Server(path)
        data, result, _ = await self.exchange(server)
        self.assertIsInstance(server.producer, SendfileProducer)
        header, body = split_header(data)
        self.assertEqual(header, b"HEADER %d" % (20 * 1024 * 1024 + 7))
        self.assertEqual(body, path.read_bytes())
        self.assertEqual(result, len(body))
        self.assertIsNone(server.producer_at_close)  # unregistered first
        self.assertEqual(open_fds(), before)

    async def test_sendfile_range(self) -> None:
        path = self.file(3 * 1024 * 1024)
        server = Server(path, offset=1_000_001, length=1_500_000)
        data, result, _ = await self.exchange(server)
        _, body = split_header(data)
        self.assertEqual(body, pattern(3 * 1024 * 1024)[1_000_001:2_500_001])
        self.assertEqual(result, 1_500_000)

    async def test_small_budget_many_turns(self) -> None:
        """With a tiny per-turn budget the transfer still completes."""
        self.patch(sendfile, "TURN_BUDGET", 64 * 1024)
        path = self.file(2 * 1024 * 1024)
        calls = []
        server = Server(path, progress=lambda s, n: calls.append(n))
        data, _, _ = await self.exchange(server)
        self.assertEqual(split_header(data)[1], path.read_bytes())
        self.assertGreaterEqual(len(calls), 32)
        self.assertLessEqual(max(calls), 64 * 1024)

    async def test_fallback_whole(self) -> None:
        path = self.file(5 * 1024 * 1024 + 3)
        before = await self.baseline()
        server = Server(path, use_sendfile=False)
        data, result, _ = await self.exchange(server)
        self.assertIsInstance(server.producer, ChunkProducer)
        self.assertEqual(split_header(data)[1], path.read_bytes())
        self.assertEqual(result, 5 * 1024 * 1024 + 3)
        self.assertEqual(open_fds(), before)

    async def _truncated(self, use_sendfile: bool) -> None:
        size = 16 * 1024 * 1024
        path = self.file(size)

        def shrink(server: Server, count: int) -> None:
            if server.sent >= 1024 * 1024 and path.stat().st_size == size:
                os.truncate(path, 2 * 1024 * 1024)

        server = Server(path, use_sendfile=use_sendfile, progress=shrink)
        data, result, _ = await self.exchange(server)
        self.assertIsInstance(result, TransferError)
        self.assertIn("shrank", result.reason)
        header, body = split_header(data)
        self.assertEqual(header, b"HEADER %d" % size)
        # Detectably short, and what came is the file's real content.
        self.assertLess(len(body), size)
        self.assertEqual(body, pattern(size)[: len(body)])

    async def test_truncated_sendfile(self) -> None:
        await self._truncated(True)

    async def test_truncated_fallback(self) -> None:
        await self._truncated(False)

    async def _grown(self, use_sendfile: bool) -> None:
        size = 4 * 1024 * 1024
        path = self.file(size)

        def grow(server: Server, count: int) -> None:
            if path.stat().st_size == size:
                with path.open("ab") as f:
                    f.write(b"appended" * 100000)

        server = Server(path, use_sendfile=use_sendfile, progress=grow)
        data, result, _ = await self.exchange(server)
        self.assertEqual(result, size)
        self.assertEqual(split_header(data)[1], pattern(size))

    async def test_grown_sendfile(self) -> None:
        await self._grown(True)

    async def test_grown_fallback(self) -> None:
        await self._grown(False)

    async def test_client_gone(self) -> None:
        """The peer aborts mid-transfer: an error result, the fd closed."""
        path = self.file(32 * 1024 * 1024)
        before = await self.baseline()
        for use_sendfile in (True, False):
            client = Client()

            def abort(c: Client) -> None:
                if c.received > 256 * 1024:
                    c.transport.abortConnection()  # type: ignore[union-attr]
                    c.on_data = None

            client.on_data = abort
            server = Server(path, use_sendfile=use_sendfile)
            data, result, _ = await self.exchange(server, client)
            self.assertIsInstance(result, TransferError)
            self.assertLess(result.sent, 32 * 1024 * 1024)
        self.assertEqual(open_fds(), before)

    async def test_slow_reader_memory_flat(self) -> None:
        """
        A reader that pauses: sendfile waits for the socket (EAGAIN) without
        queueing anything in the transport, then finishes when it reads.
        """
        path = self.file(16 * 1024 * 1024)
        client = Client()
        server = Server(path)
        checked: list[int] = []

        def pause_then_resume(c: Client) -> None:
            if c.received > 1024 * 1024 and not checked:
                c.transport.pauseProducing()  # type: ignore[union-attr]
                checked.append(c.received)
                reactor.callLater(0.2, check_and_resume, c)

        def check_and_resume(c: Client) -> None:
            transport: Any = server.transport
            queued = len(transport.dataBuffer) - transport.offset
            checked.append(queued + transport._tempDataLen)
            self.assertLess(server.sent, 16 * 1024 * 1024)
            c.transport.resumeProducing()  # type: ignore[union-attr]

        client.on_data = pause_then_resume
        data, result, _ = await self.exchange(server, client)
        self.assertEqual(result, 16 * 1024 * 1024)
        self.assertEqual(checked[1], 0)  # nothing buffered in user space
        self.assertEqual(split_header(data)[1], path.read_bytes())

    async def test_tls_uses_fallback(self) -> None:
        path = self.file(3 * 1024 * 1024 + 11)
        certificate = ssl.PrivateCertificate.loadPEM(self_signed_pem())
        server = Server(path)
        factory = Factory.forProtocol(lambda: server)
        port = reactor.listenSSL(
            0, factory, certificate.options(), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        client = Client()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        from twisted.internet.endpoints import wrapClientTLS

        tls = wrapClientTLS(ssl.CertificateOptions(verify=False), endpoint)
        await connectProtocol(tls, client)
        data = await client.lost
        result = await server.done
        self.assertIsInstance(server.producer, ChunkProducer)
        self.assertEqual(result, 3 * 1024 * 1024 + 11)
        self.assertEqual(split_header(data)[1], path.read_bytes())


class MemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "f.bin"
        self.path.write_bytes(pattern(1024 * 1024))

    def pump(self, transport: StringTransport, turns: int = 100) -> None:
        for _ in range(turns):
            if transport.producer is None:
                return
            transport.producer.resumeProducing()

    def test_not_a_socket(self) -> None:
        self.assertFalse(can_sendfile(StringTransport()))

    def test_chunks(self) -> None:
        transport = StringTransport()
        fd = os.open(self.path, os.O_RDONLY)
        producer, result = send_file(transport, fd, 0, 1024 * 1024, Clock())
        self.assertIsInstance(producer, ChunkProducer)
        self.assertIs(transport.producer, producer)
        self.assertFalse(transport.streaming)
        self.pump(transport)
        self.assertEqual(self.successResultOf(result), 1024 * 1024)
        self.assertEqual(transport.value(), self.path.read_bytes())
        self.assertIsNone(transport.producer)
        self.assertTrue(producer.done)

    def test_zero_length(self) -> None:
        transport = StringTransport()
        fd = os.open(self.path, os.O_RDONLY)
        _, result = send_file(transport, fd, 0, 0, Clock())
        self.assertEqual(self.successResultOf(result), 0)
        self.assertIsNone(transport.producer)
        self.assertRaises(OSError, os.fstat, fd)

    def test_stop_closes(self) -> None:
        transport = StringTransport()
        fd = os.open(self.path, os.O_RDONLY)
        producer, result = send_file(transport, fd, 0, 1024 * 1024, Clock())
        producer.resumeProducing()
        producer.stopProducing()
        failure = self.failureResultOf(result, TransferError)
        self.assertEqual(failure.value.sent, sendfile.CHUNK)
        self.assertRaises(OSError, os.fstat, fd)
        producer.resumeProducing()  # after the end: nothing happens
        self.assertEqual(len(transport.value()), sendfile.CHUNK)

    def test_rate_limited(self) -> None:
        """256 KiB/s per connection: 1 MiB takes about four seconds."""
        clock = Clock()
        transport = StringTransport()
        fd = os.open(self.path, os.O_RDONLY)
        pacer = Pacer(Bucket(256 * 1024, clock))
        producer, result = send_file(transport, fd, 0, 1024 * 1024, clock, pacer)
        self.pump(transport)
        sent_at_start = len(transport.value())
        self.assertEqual(sent_at_start, 256 * 1024)  # one second's burst
        self.assertNoResult(result)
        for _ in range(40):
            clock.advance(0.1)
            self.pump(transport)
        self.assertEqual(self.successResultOf(result), 1024 * 1024)
        self.assertEqual(transport.value(), self.path.read_bytes())
        self.assertGreaterEqual(clock.seconds(), 2.9)

    def test_total_bucket_shared(self) -> None:
        """Two transfers under one total cap share it."""
        clock = Clock()
        total = Bucket(256 * 1024, clock)
        transports = [StringTransport(), StringTransport()]
        for transport in transports:
            fd = os.open(self.path, os.O_RDONLY)
            send_file(transport, fd, 0, 1024 * 1024, clock, Pacer(None, total))
            self.pump(transport)
        self.assertEqual(sum(len(t.value()) for t in transports), 256 * 1024)
        clock.advance(1)
        for transport in transports:
            self.pump(transport)
        self.assertEqual(sum(len(t.value()) for t in transports), 512 * 1024)

    def test_bucket(self) -> None:
        clock = Clock()
        bucket = Bucket(1000, clock)
        self.assertEqual(bucket.available(), 1000)
        bucket.spend(1000)
        self.assertEqual(bucket.available(), 0)
        self.assertAlmostEqual(bucket.wait(500), 0.5)
        clock.advance(10)
        self.assertEqual(bucket.available(), 1000)  # at most one second saved
