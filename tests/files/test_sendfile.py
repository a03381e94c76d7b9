"""
Tests for L{sockd.files.sendfile}: over real loopback connections under the real
reactor (sendfile, the chunk fallback, TLS), and in memory for pacing.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import sockd.files.sendfile as sendfile
from sockd.files.sendfile import (
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
        self.pacer: Pacer | None = None
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
            pacer=self.pacer,
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


# Real-reactor tests run under pytest-twisted (the reactor in a greenlet):
# trial's TestCase cannot spin the reactor once pytest-twisted has started it.
TIMEOUT = 20


def make_file(directory: Path, size: int, name: str = "f.bin") -> Path:
    path = directory / name
    path.write_bytes(pattern(size))
    return path


def timed(d: Deferred[Any]) -> Deferred[Any]:
    return d.addTimeout(TIMEOUT, reactor)


async def exchange(
    server: Server, client: Client | None = None
) -> tuple[bytes, Any, Client]:
    """Serve one connection; return what the client got and the result."""
    factory = Factory.forProtocol(lambda: server)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        client = client or Client()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await timed(connectProtocol(endpoint, client))
        data = await timed(client.lost)
        try:
            result = await timed(server.done)
        except TransferError as e:
            result = e
        await timed(server.closed)
    finally:
        await port.stopListening()
    return data, result, client


async def baseline(directory: Path) -> int:
    """The descriptor count once the reactor has made its own (a first run
    opens a few) and one small transfer has come and gone."""
    await exchange(Server(make_file(directory, 10, "warm.bin")))
    return open_fds()


@pytest_twisted.ensureDeferred
async def test_sendfile_whole(tmp_path: Path) -> None:
    """A 20 MiB file, header first, byte for byte, fd closed after."""
    size = 20 * 1024 * 1024 + 7
    path = make_file(tmp_path, size)
    before = await baseline(tmp_path)
    server = Server(path)
    data, result, _ = await exchange(server)
    assert isinstance(server.producer, SendfileProducer)
    header, body = split_header(data)
    assert header == b"HEADER %d" % size
    assert body == path.read_bytes()
    assert result == size
    assert server.producer_at_close is None  # unregistered first
    assert open_fds() == before


@pytest_twisted.ensureDeferred
async def test_sendfile_range(tmp_path: Path) -> None:
    path = make_file(tmp_path, 3 * 1024 * 1024)
    server = Server(path, offset=1_000_001, length=1_500_000)
    data, result, _ = await exchange(server)
    assert split_header(data)[1] == pattern(3 * 1024 * 1024)[1_000_001:2_500_001]
    assert result == 1_500_000


@pytest_twisted.ensureDeferred
async def test_small_budget_many_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a tiny per-turn budget the transfer still completes."""
    monkeypatch.setattr(sendfile, "TURN_BUDGET", 64 * 1024)
    path = make_file(tmp_path, 2 * 1024 * 1024)
    calls: list[int] = []
    server = Server(path, progress=lambda s, n: calls.append(n))
    data, _, _ = await exchange(server)
    assert split_header(data)[1] == path.read_bytes()
    assert len(calls) >= 32
    assert max(calls) <= 64 * 1024


@pytest_twisted.ensureDeferred
async def test_fallback_whole(tmp_path: Path) -> None:
    size = 5 * 1024 * 1024 + 3
    path = make_file(tmp_path, size)
    before = await baseline(tmp_path)
    server = Server(path, use_sendfile=False)
    data, result, _ = await exchange(server)
    assert isinstance(server.producer, ChunkProducer)
    assert split_header(data)[1] == path.read_bytes()
    assert result == size
    assert open_fds() == before


@pytest.mark.parametrize("use_sendfile", [True, False])
@pytest_twisted.ensureDeferred
async def test_truncated(tmp_path: Path, use_sendfile: bool) -> None:
    """The file shrinks mid-send: detectably short, never a stall."""
    size = 16 * 1024 * 1024
    path = make_file(tmp_path, size)

    def shrink(server: Server, count: int) -> None:
        if server.sent >= 1024 * 1024 and path.stat().st_size == size:
            os.truncate(path, 2 * 1024 * 1024)

    server = Server(path, use_sendfile=use_sendfile, progress=shrink)
    data, result, _ = await exchange(server)
    assert isinstance(result, TransferError)
    assert "shrank" in result.reason
    header, body = split_header(data)
    assert header == b"HEADER %d" % size
    assert len(body) < size
    assert body == pattern(size)[: len(body)]  # what came is the real content


@pytest.mark.parametrize("use_sendfile", [True, False])
@pytest_twisted.ensureDeferred
async def test_grown(tmp_path: Path, use_sendfile: bool) -> None:
    """The file grows mid-send: only the announced bytes go out."""
    size = 4 * 1024 * 1024
    path = make_file(tmp_path, size)

    def grow(server: Server, count: int) -> None:
        if path.stat().st_size == size:
            with path.open("ab") as f:
                f.write(b"appended" * 100000)

    server = Server(path, use_sendfile=use_sendfile, progress=grow)
    data, result, _ = await exchange(server)
    assert result == size
    assert split_header(data)[1] == pattern(size)


@pytest_twisted.ensureDeferred
async def test_client_gone(tmp_path: Path) -> None:
    """The peer aborts mid-transfer: an error result, the fd closed."""
    path = make_file(tmp_path, 32 * 1024 * 1024)
    before = await baseline(tmp_path)
    for use_sendfile in (True, False):
        client = Client()

        def abort(c: Client) -> None:
            if c.received > 256 * 1024:
                c.transport.abortConnection()  # type: ignore[union-attr]
                c.on_data = None

        client.on_data = abort
        server = Server(path, use_sendfile=use_sendfile)
        _, result, _ = await exchange(server, client)
        assert isinstance(result, TransferError)
        assert result.sent < 32 * 1024 * 1024
    assert open_fds() == before


@pytest_twisted.ensureDeferred
async def test_slow_reader_memory_flat(tmp_path: Path) -> None:
    """
    A reader that pauses: sendfile waits for the socket (EAGAIN) without
    queueing anything in the transport, then finishes when it reads.
    """
    size = 16 * 1024 * 1024
    path = make_file(tmp_path, size)
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
        checked.append(server.sent)
        c.transport.resumeProducing()  # type: ignore[union-attr]

    client.on_data = pause_then_resume
    data, result, _ = await exchange(server, client)
    assert result == size
    assert checked[1] == 0  # nothing buffered in user space
    assert checked[2] < size  # it did wait for the reader
    assert split_header(data)[1] == path.read_bytes()


@pytest_twisted.ensureDeferred
async def test_tls_uses_fallback(tmp_path: Path) -> None:
    size = 3 * 1024 * 1024 + 11
    path = make_file(tmp_path, size)
    certificate = ssl.PrivateCertificate.loadPEM(self_signed_pem())
    server = Server(path)
    factory = Factory.forProtocol(lambda: server)
    port = reactor.listenSSL(0, factory, certificate.options(), interface="127.0.0.1")
    try:
        client = Client()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        tls = wrapClientTLS(ssl.CertificateOptions(verify=False), endpoint)
        await timed(connectProtocol(tls, client))
        data = await timed(client.lost)
        result = await timed(server.done)
        await timed(server.closed)
    finally:
        await port.stopListening()
    assert isinstance(server.producer, ChunkProducer)
    assert result == size
    assert split_header(data)[1] == path.read_bytes()


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


@pytest_twisted.ensureDeferred
async def test_sendfile_paced(tmp_path: Path) -> None:
    """A 512 KiB/s cap on sendfile: 1 MiB takes about a second."""
    size = 2 * 512 * 1024
    path = make_file(tmp_path, size)
    server = Server(path)
    server.pacer = Pacer(Bucket(512 * 1024, reactor))
    started = reactor.seconds()
    data, result, _ = await exchange(server)
    assert isinstance(server.producer, SendfileProducer)
    assert result == size
    assert split_header(data)[1] == path.read_bytes()
    assert reactor.seconds() - started >= 0.9
