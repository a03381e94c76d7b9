"""
Tests for L{sockd.files.sendfile}: over real loopback connections under the real
reactor (sendfile, the chunk fallback, TLS), and in memory for pacing.
"""

from __future__ import annotations

import datetime
import os
import socket
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
from sockd.core._twisted import queued_bytes
from sockd.core.limits import TokenBucket
from sockd.files.sendfile import (
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


def cap(rate: int, clock: Any) -> TokenBucket:
    """A byte-rate cap as the file service makes one: one second's burst."""
    return TokenBucket(rate, rate, clock)


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
        checked.append(queued_bytes(transport))
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
        self.assertTrue(transport.streaming)  # paused by the transport, not polled
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
        """256 KiB/s per connection: 1 MiB takes three seconds after the burst."""
        clock = Clock()
        transport = StringTransport()
        fd = os.open(self.path, os.O_RDONLY)
        pacer = Pacer(cap(256 * 1024, clock))
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
        total = cap(256 * 1024, clock)
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


@pytest_twisted.ensureDeferred
async def test_sendfile_paced(tmp_path: Path) -> None:
    """
    A 512 KiB/s cap on sendfile: 1 MiB takes about a second, in a few
    large sends (a burst, then a second's worth), not one per refill.
    """
    size = 2 * 512 * 1024
    path = make_file(tmp_path, size)
    sends: list[int] = []
    server = Server(path, progress=lambda s, n: sends.append(n) if n else None)
    server.pacer = Pacer(cap(512 * 1024, reactor))
    started = reactor.seconds()
    data, result, _ = await exchange(server)
    assert isinstance(server.producer, SendfileProducer)
    assert result == size
    assert split_header(data)[1] == path.read_bytes()
    assert reactor.seconds() - started >= 0.9
    # Two quanta; a full socket buffer may split each into a few calls.
    assert len(sends) < 50, sends


@pytest_twisted.ensureDeferred
async def test_tls_paced_is_not_polled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Under TLS a paced transfer sleeps on its timer: the producer is asked
    for more only when the connection has room (a pull producer there is
    polled in a loop by Twisted's TLS wrapper, burning a core).
    """
    asked: list[None] = []

    class Counting(ChunkProducer):
        def resumeProducing(self) -> None:
            asked.append(None)
            super().resumeProducing()

    monkeypatch.setattr(sendfile, "ChunkProducer", Counting)
    size = 768 * 1024
    path = make_file(tmp_path, size)
    certificate = ssl.PrivateCertificate.loadPEM(self_signed_pem())
    server = Server(path)
    server.pacer = Pacer(cap(512 * 1024, reactor))
    factory = Factory.forProtocol(lambda: server)
    port = reactor.listenSSL(0, factory, certificate.options(), interface="127.0.0.1")
    started = reactor.seconds()
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
    assert isinstance(server.producer, Counting)
    assert result == size
    assert split_header(data)[1] == path.read_bytes()
    assert reactor.seconds() - started >= 0.45  # 256 KiB after the burst
    assert len(asked) < 50


class SocketTransport:
    """
    Just enough of a TCP transport for L{SendfileProducer}, over one end of
    a socket pair: the test plays the reactor, calling L{doWrite} while the
    producer has asked for it (C{startWriting}).
    """

    disconnected = False
    disconnecting = False

    def __init__(self, sock: socket.socket) -> None:
        self.sock = self.socket = sock
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.producer: Any = None
        self.writing = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def write(self, data: bytes) -> None:
        """A header: small, so the kernel takes it at once."""
        assert self.sock.send(data) == len(data)

    def startWriting(self) -> None:
        self.writing = True

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert not streaming
        self.producer = producer
        producer.resumeProducing()  # as a TCP transport does for a pull producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def doWrite(self) -> None:
        """The socket is writable and our buffer empty: ask for more."""
        self.writing = False
        if self.producer is not None:
            self.producer.resumeProducing()


class PausingTransport(StringTransport):
    """Pauses a push producer once more than 64 KiB is queued, as TCP does."""

    queued = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.queued += len(data)
        if self.streaming and self.queued > 64 * 1024:
            self.producerState = "paused"
            self.producer.pauseProducing()

    def drain(self) -> None:
        """The queue went out: resume the producer."""
        self.queued = 0
        if self.producer is not None and self.producerState == "paused":
            self.producerState = "producing"
            self.producer.resumeProducing()


class PacingTests(SynchronousTestCase):
    """
    Throttled transfers in memory, on a clock advanced in 10 ms steps:
    they send in quanta (not a crumb per refill), hold to the rate, do
    not delay the tail, and share a total cap fairly.
    """

    RATE = 128 * 1024
    STEP = 1 / 128  # exact in binary: times do not drift

    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "f.bin"
        self.size = 1024 * 1024 + 1000  # eight quanta and a tail
        self.path.write_bytes(pattern(self.size))
        #: (clock time, bytes) for each send, per transfer
        self.sends: list[list[tuple[float, int]]] = []

    def progress(self, index: int) -> Callable[[int], None]:
        def record(count: int) -> None:
            if count:
                self.sends[index].append((self.clock.seconds(), count))

        return record

    def sendfile(self, pacer: Pacer) -> tuple[Deferred[int], Callable[[], bytes]]:
        """A sendfile transfer to a socket pair; returns its result and a reader."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        theirs.setblocking(False)
        transport = SocketTransport(ours)
        self.transports.append(transport)
        self.sends.append([])
        received: list[bytes] = []

        def read() -> bytes:
            while True:
                try:
                    data = theirs.recv(1024 * 1024)
                except BlockingIOError:
                    return b"".join(received)
                received.append(data)

        self.readers.append(read)
        fd = os.open(self.path, os.O_RDONLY)
        producer = SendfileProducer(
            fd, 0, self.size, self.clock, pacer, self.progress(len(self.sends) - 1)
        )
        return producer.start(transport), read

    transports: list[SocketTransport]
    readers: list[Callable[[], bytes]]

    def run_until(self, until: float) -> None:
        """Play the reactor: writes the producers asked for, reads, time."""
        while self.clock.seconds() < until - 1e-9:
            for transport, read in zip(self.transports, self.readers, strict=True):
                for _ in range(1000):
                    read()
                    if not transport.writing:
                        break
                    transport.doWrite()
                # Waiting on a timer, never on a call due at once (a spin).
                now = self.clock.seconds()
                self.assertTrue(
                    all(c.getTime() > now for c in self.clock.getDelayedCalls())
                )
            self.clock.advance(self.STEP)

    def per_instant(self, index: int) -> list[int]:
        """Bytes sent at each clock instant (a full socket splits a send)."""
        sums: dict[float, int] = {}
        for when, count in self.sends[index]:
            sums[when] = sums.get(when, 0) + count
        return list(sums.values())

    def test_sends_in_quanta(self) -> None:
        """
        128 KiB/s: a second's worth at a time, so nine sends for eight
        quanta and the tail, not one per 10 ms of refill.
        """
        self.transports, self.readers = [], []
        result, read = self.sendfile(Pacer(cap(self.RATE, self.clock)))
        self.run_until(10)
        self.assertEqual(self.successResultOf(result), self.size)
        self.assertEqual(read(), self.path.read_bytes())
        sizes = self.per_instant(0)
        self.assertEqual(sizes, [self.RATE] * 8 + [1000])
        self.assertLess(len(self.sends[0]), 40)  # sendfile calls, all told

    def test_rate_honoured_and_tail_not_delayed(self) -> None:
        """Bytes by time t <= rate * t + burst; the 1000-byte tail waits
        for its own 8 ms of refill, not for a whole quantum."""
        self.transports, self.readers = [], []
        result, _ = self.sendfile(Pacer(cap(self.RATE, self.clock)))
        sent = 0
        for when, count in self.sends[0]:
            self.assertLessEqual(sent + count, self.RATE * when + self.RATE)
            sent += count
        self.run_until(10)
        self.successResultOf(result)
        sent = 0
        for when, count in self.sends[0]:
            sent += count
            self.assertLessEqual(sent, self.RATE * when + self.RATE + 1)
        last = self.sends[0][-1][0]
        self.assertLess(last, 7.02)  # the eighth quantum went at 7.0

    def test_shared_total_bucket(self) -> None:
        """
        Three transfers under one total cap take turns: the total holds to
        the rate, each gets a third, each send is a fair share.
        """
        self.transports, self.readers = [], []
        total = cap(3 * self.RATE, self.clock)
        results = [self.sendfile(Pacer(None, total))[0] for _ in range(3)]
        self.run_until(4)
        for result in results:
            self.assertNoResult(result)
        totals = [sum(count for _, count in sends) for sends in self.sends]
        self.assertLessEqual(sum(totals), 3 * self.RATE * 4 + 3 * self.RATE)
        self.assertGreater(sum(totals), 3 * self.RATE * 3)
        self.assertLessEqual(max(totals) - min(totals), 3 * self.RATE)
        for index in range(3):
            sizes = self.per_instant(index)
            self.assertTrue(all(size >= self.RATE for size in sizes), sizes)
        self.run_until(12)
        self.assertEqual([self.successResultOf(r) for r in results], [self.size] * 3)
        # Every transfer has left the bucket: nothing paid is outstanding.
        self.assertNotIn(total, Pacer._sharing)

    def test_chunks_paced_in_quanta(self) -> None:
        """The TLS fallback too: a write per quantum, asleep in between."""
        transport = StringTransport()
        writes: list[tuple[float, int]] = []
        fd = os.open(self.path, os.O_RDONLY)
        _, result = send_file(
            transport,
            fd,
            0,
            self.size,
            self.clock,
            Pacer(cap(self.RATE, self.clock)),
            lambda n: writes.append((self.clock.seconds(), n)),
        )
        self.assertTrue(transport.streaming)
        for _ in range(1000):
            now = self.clock.seconds()
            self.assertTrue(
                all(c.getTime() > now for c in self.clock.getDelayedCalls())
                or not writes
            )
            self.clock.advance(self.STEP)
            if transport.producer is None:
                break
        self.assertEqual(self.successResultOf(result), self.size)
        self.assertEqual(transport.value(), self.path.read_bytes())
        self.assertEqual([n for _, n in writes], [self.RATE] * 8 + [1000])

    def test_paused_chunks_wait_for_resume(self) -> None:
        """
        A transport that pauses the producer when its buffer fills (as a
        TCP or TLS transport does) gets nothing more until it resumes it.
        """
        transport = PausingTransport()
        fd = os.open(self.path, os.O_RDONLY)
        producer, result = send_file(transport, fd, 0, self.size, self.clock)
        self.clock.advance(0)
        self.assertEqual(len(transport.value()), sendfile.CHUNK)
        self.clock.advance(1)
        self.assertEqual(len(transport.value()), sendfile.CHUNK)
        for turn in range(2, 10):
            transport.drain()
            self.clock.advance(0)
            if transport.producer is None:
                break
            self.assertEqual(len(transport.value()), turn * sendfile.CHUNK)
        self.assertEqual(self.successResultOf(result), self.size)
        self.assertEqual(transport.value(), self.path.read_bytes())

    def test_ended_transfer_refunds(self) -> None:
        """A transfer cut short gives back what it paid for and did not send."""
        total = cap(self.RATE, self.clock)
        transport = StringTransport()
        fd = os.open(self.path, os.O_RDONLY)
        producer, result = send_file(
            transport, fd, 0, self.size, self.clock, Pacer(None, total)
        )
        self.clock.advance(0)  # the burst
        producer.resumeProducing()  # pays for the next quantum, in debt
        self.assertLess(total.available(), 0)
        producer.stopProducing()
        self.failureResultOf(result, TransferError)
        self.assertEqual(total.available(), 0)


CORK = getattr(socket, "TCP_CORK", None)
needs_cork = pytest.mark.skipif(CORK is None, reason="TCP_CORK is Linux's")


class RecordingSocket(socket.socket):
    """A TCP socket noting, in order, its TCP_CORK changes and its sends."""

    def __init__(self) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.events: list[tuple[str, int]] = []

    def setsockopt(self, *args: Any) -> None:
        if args[:2] == (socket.IPPROTO_TCP, CORK):
            self.events.append(("cork", args[2]))
        super().setsockopt(*args)

    def send(self, data: Any, flags: int = 0) -> int:
        sent = super().send(data, flags)
        self.events.append(("send", sent))
        return sent

    def corked(self) -> int:
        return self.getsockopt(socket.IPPROTO_TCP, CORK)


@needs_cork
class CorkTests(SynchronousTestCase):
    """
    L{SendfileProducer} corks a TCP socket before the header and uncorks
    it after the body's last byte, and whenever it stops early or waits for
    its rate cap: the header and the tail never wait on the cork, and a
    connection is never left corked.
    """

    HEAD = b"HEADER\r\n"

    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "f.bin"
        self.size = 3 * 1024 * 1024 + 5
        self.path.write_bytes(pattern(self.size))
        # Small buffers: the body takes many turns, as over a real network.
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            self.ours = RecordingSocket()
            self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            self.ours.connect(listener.getsockname())
            self.theirs, _ = listener.accept()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        self.transport = SocketTransport(self.ours)
        self.received: list[bytes] = []

    def progress(self, count: int) -> None:
        # Each body send, and whether the socket was corked just after it.
        self.ours.events.append(("body", count))
        self.ours.events.append(("corked", self.ours.corked()))

    def start(self, pacer: Pacer | None = None) -> tuple[Any, Deferred[int]]:
        fd = os.open(self.path, os.O_RDONLY)
        producer = SendfileProducer(fd, 0, self.size, self.clock, pacer, self.progress)
        result = producer.start(self.transport, self.HEAD)
        result.addBoth(self.ended)
        return producer, result

    def ended(self, result: Any) -> Any:
        closed = self.ours.fileno() == -1
        self.ours.events.append(("ended", -1 if closed else self.ours.corked()))
        return result

    def read(self) -> bytes:
        while True:
            try:
                data = self.theirs.recv(1024 * 1024)
            except BlockingIOError:
                return b"".join(self.received)
            if not data:
                return b"".join(self.received)
            self.received.append(data)

    def drive(self, turns: int = 1000) -> None:
        """Play the reactor: read, and write while the producer asks to."""
        for _ in range(turns):
            if self.theirs.fileno() != -1:
                self.read()
            if not self.transport.writing:
                return
            self.transport.doWrite()

    def test_header_and_body_corked_then_uncorked(self) -> None:
        _, result = self.start()
        self.drive()
        self.assertEqual(self.successResultOf(result), self.size)
        self.assertEqual(self.read(), self.HEAD + self.path.read_bytes())
        events = self.ours.events
        # Corked before the header went to the kernel ...
        self.assertEqual(events[:2], [("cork", 1), ("send", len(self.HEAD))])
        # ... every body send made corked ...
        bodies = [i for i, (kind, _) in enumerate(events) if kind == "body"]
        self.assertGreater(len(bodies), 1)  # the socket filled: several turns
        self.assertTrue(all(events[i + 1] == ("corked", 1) for i in bodies))
        # ... and uncorked after the last, before the result fires.
        self.assertEqual(events[bodies[-1] + 2 :], [("cork", 0), ("ended", 0)])

    def test_one_sendfile_call_a_wake(self) -> None:
        """A short send means the socket is full: no call just for EAGAIN."""
        calls: list[str] = []
        real = os.sendfile

        def counted(*args: Any) -> int:
            try:
                count = real(*args)
            except BlockingIOError:
                calls.append("EAGAIN")
                raise
            calls.append("sent")
            return count

        self.patch(os, "sendfile", counted)
        _, result = self.start()
        self.drive()  # the reader drains the socket before each wake
        self.assertEqual(self.successResultOf(result), self.size)
        self.assertGreater(len(calls), 1)
        self.assertEqual(set(calls), {"sent"})

    def test_client_close_uncorks(self) -> None:
        _, result = self.start()
        self.theirs.close()
        self.drive()
        failure = self.failureResultOf(result, TransferError)
        self.assertLess(failure.value.sent, self.size)
        self.assertEqual(self.ours.events[-2:], [("cork", 0), ("ended", 0)])

    def test_abort_uncorks(self) -> None:
        """The connection lost (C{stopProducing}) while the body streams."""
        producer, result = self.start()
        self.assertEqual(self.ours.corked(), 1)
        producer.stopProducing()
        self.failureResultOf(result, TransferError)
        self.assertEqual(self.ours.events[-2:], [("cork", 0), ("ended", 0)])

    def test_closing_transport_uncorks(self) -> None:
        """A close asked for meanwhile: the transfer stops, uncorked."""
        _, result = self.start()
        self.transport.disconnecting = True
        self.drive()
        self.failureResultOf(result, TransferError)
        self.assertEqual(self.ours.events[-2:], [("cork", 0), ("ended", 0)])

    def test_socket_already_closed(self) -> None:
        """Uncorking a socket the transport has closed is no error."""
        producer, result = self.start()
        self.ours.close()
        producer.stopProducing()
        self.failureResultOf(result, TransferError)
        self.assertEqual(self.ours.events[-2:], [("cork", 0), ("ended", -1)])

    def test_uncorked_while_the_rate_cap_waits(self) -> None:
        """
        Capped at 1 MiB/s: each quantum goes corked and is uncorked as the
        producer waits for the next, so its tail is not held meanwhile.
        """
        rate = 1024 * 1024
        _, result = self.start(Pacer(cap(rate, self.clock)))
        waits = 0
        for _ in range(100):
            self.drive()
            if self.clock.getDelayedCalls():
                waits += 1
                self.assertEqual(self.ours.corked(), 0)
                self.assertEqual(self.ours.events[-1], ("cork", 0))
            self.clock.advance(0.25)
            self.transport.doWrite()  # a wake: as the reactor would after it
        self.drive()
        self.assertEqual(self.successResultOf(result), self.size)
        self.assertEqual(self.read(), self.HEAD + self.path.read_bytes())
        self.assertGreaterEqual(waits, 3)
        events = self.ours.events
        bodies = [i for i, (kind, _) in enumerate(events) if kind == "body"]
        self.assertTrue(all(events[i + 1] == ("corked", 1) for i in bodies))
        self.assertEqual(events[-2:], [("cork", 0), ("ended", 0)])
        self.assertGreaterEqual(events.count(("cork", 1)), 4)

    def test_empty_body_not_corked(self) -> None:
        """Nothing to stream: the header goes alone, at once."""
        self.size = 0
        self.path.write_bytes(b"")
        _, result = self.start()
        self.assertEqual(self.successResultOf(result), 0)
        self.assertEqual(self.read(), self.HEAD)
        self.assertNotIn(("cork", 1), self.ours.events)

    def test_chunk_producer_never_corks(self) -> None:
        """The fallback (TLS, use_sendfile off) leaves the socket alone."""
        transport = StringTransport()
        transport.socket = self.ours  # type: ignore[attr-defined]
        fd = os.open(self.path, os.O_RDONLY)
        producer, result = send_file(
            transport, fd, 0, self.size, self.clock, use_sendfile=False, head=b"H\n"
        )
        self.assertIsInstance(producer, ChunkProducer)
        for _ in range(20):
            self.clock.advance(0)
        self.successResultOf(result)
        self.assertEqual(transport.value(), b"H\n" + self.path.read_bytes())
        self.assertEqual(self.ours.events, [])
