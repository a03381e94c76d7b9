"""
Blocking client side of the sockd-file framed protocol (docs/protocol-file.md):
request lines out, C{OK ...} / C{ERR <code> <reason>} answers in, bodies
moved in large chunks straight between the socket and a sink.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from sockd.client.exits import (
    EXIT_CONNECT,
    EXIT_ERROR,
    EXIT_FORBIDDEN,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_SERVER,
    EXIT_USAGE,
    EXIT_VERIFY,
)
from sockd.core.text import REPLY, sanitise
from sockd.files import codec

__all__ = [
    "CHUNK",
    "DEFAULT_PORT",
    "EXIT_CONNECT",
    "EXIT_ERROR",
    "EXIT_FORBIDDEN",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_SERVER",
    "EXIT_USAGE",
    "EXIT_VERIFY",
    "CertificateRefused",
    "ClientError",
    "ConnectFailed",
    "Connection",
    "Direct",
    "Entry",
    "FileClient",
    "Found",
    "Pipeline",
    "ProtocolError",
    "ServerError",
    "Sink",
    "Transfer",
    "Truncated",
    "VerifyFailed",
    "quote",
    "sink_for",
    "unquote",
]

DEFAULT_PORT = 8898
#: bytes per socket read and per file write
CHUNK = 1024 * 1024
#: the longest answer line accepted; server lines are short
MAX_LINE = 8192


#: TCP_QUICKACK where the platform has it (Linux)
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)

# Busy or stopping servers refuse the connection: retrying later may work.
_ERR_STATUS = {
    401: EXIT_FORBIDDEN,
    403: EXIT_FORBIDDEN,
    404: EXIT_NOT_FOUND,
    429: EXIT_CONNECT,
    503: EXIT_CONNECT,
}

_T = TypeVar("_T")


def quote(path: str | bytes) -> str:
    """Percent-encode a path for a request line (UTF-8, or raw bytes as given)."""
    raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
    return codec.percent_encode(raw).decode("ascii")


def unquote(text: bytes) -> bytes:
    """Decode the C{%XX} escapes of a name from a listing (bad ones kept)."""
    return codec.percent_decode(text, strict=False)


class ClientError(Exception):
    """A failure reported to the user, with the exit status it maps to."""

    status = EXIT_ERROR


class ConnectFailed(ClientError):
    """Could not connect, or the connection failed or timed out."""

    status = EXIT_CONNECT


class Truncated(ConnectFailed):
    """The server closed before sending every announced byte."""

    def __init__(self, received: int, expected: int) -> None:
        super().__init__(f"connection closed after {received} of {expected} bytes")
        self.received = received
        self.expected = expected


class ProtocolError(ClientError):
    """The server said something the protocol does not allow."""

    status = EXIT_SERVER


class VerifyFailed(ClientError):
    """A checksum or a TLS certificate did not verify."""

    status = EXIT_VERIFY


class CertificateRefused(ClientError):
    """The server refused our TLS client certificate, or its absence."""

    status = EXIT_FORBIDDEN


#: TLS alerts a server sends when it will not take the client's certificate
_CERTIFICATE_ALERTS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
    }
)


def _failed(name: str, what: str, error: OSError) -> ClientError:
    """The error to report for C{error} while doing C{what} on C{name}."""
    if isinstance(error, ssl.SSLError) and error.reason in _CERTIFICATE_ALERTS:
        alert = error.reason.lower().replace("_", " ")
        return CertificateRefused(
            f"{name}: the server refused the TLS client certificate ({alert}): "
            "give --cert FILE --key FILE, signed by a CA the server trusts"
        )
    return ConnectFailed(f"{name}: {what}: {_describe(error)}")


class ServerError(ClientError):
    """
    An C{ERR <code> [<cause>: ]<reason>} answer, or an HTTP error status;
    C{cause} is one of L{sockd.files.names.CAUSES}, or None.
    """

    def __init__(
        self, code: int, reason: str, message: str = "", cause: str | None = None
    ) -> None:
        super().__init__(message or f"server error {code}: {reason}")
        self.code = code
        self.reason = reason
        self.cause = cause
        self.status = _ERR_STATUS.get(code, EXIT_SERVER)


#: the answers the client reads, as the shared codec parses them
Found = codec.StatAnswer
Entry = codec.ListLine
Transfer = codec.GetHeader


def _describe(error: OSError) -> str:
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out"
    return error.strerror or str(error) or type(error).__name__


class Connection:
    """A connected (maybe TLS) socket with a line reader on top."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self._pending = bytearray()
        self._line = memoryview(bytearray(MAX_LINE))

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> Connection:
        name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ConnectFailed(f"{name}: cannot connect: {_describe(e)}") from e
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=host)
            except ssl.SSLCertVerificationError as e:
                sock.close()
                raise VerifyFailed(
                    f"{name}: TLS certificate not accepted: {e.verify_message}"
                ) from e
            except OSError as e:
                sock.close()
                raise _failed(name, "TLS handshake failed", e) from e
        return cls(sock, name)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_into(self, view: memoryview) -> int:
        try:
            return self.sock.recv_into(view)
        except OSError as e:
            raise _failed(self.name, "receive failed", e) from e

    def read(self, view: memoryview) -> int:
        """Bytes received into C{view}, buffered ones first; 0 at the end."""
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            del self._pending[:n]
            return n
        return self._recv_into(view)

    def _quickack(self) -> None:
        # Acknowledge an answer line at once: a server that writes the line
        # and then the body under Nagle's algorithm holds a small body back
        # until that ACK, which a delayed ACK postpones by 40 ms (per file).
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def send_line(self, line: str) -> None:
        try:
            self.sock.sendall(line.encode("ascii") + b"\r\n")
        except OSError as e:
            raise _failed(self.name, "send failed", e) from e

    def readline(self) -> bytes:
        """The next line without its ending; C{ConnectFailed} at EOF."""
        while True:
            end = self._pending.find(b"\n")
            if end >= 0:
                line = bytes(self._pending[:end])
                del self._pending[: end + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._pending) > MAX_LINE:
                raise ProtocolError(f"{self.name}: answer line too long")
            n = self._recv_into(self._line)
            if n == 0:
                raise ConnectFailed(f"{self.name}: server closed the connection")
            self._pending += self._line[:n]
            self._quickack()

    def answer(self) -> str:
        """The text after C{OK}; C{ServerError} for an C{ERR} line."""
        try:
            answer = codec.parse_answer(self.readline())
        except codec.CodecError as e:
            raise ProtocolError(
                f"{self.name}: unexpected answer {sanitise(e.text, REPLY)!r}"
            ) from None
        if isinstance(answer, codec.Failure):
            raise ServerError(
                answer.code, sanitise(answer.reason, REPLY), cause=answer.cause
            )
        return answer

    def receive(self, length: int, sink: Sink) -> None:
        """Pass exactly C{length} bytes to C{sink}; C{Truncated} if cut short."""
        done = 0
        if self._pending:
            head = self._pending[:length]
            del self._pending[: len(head)]
            view = sink.take()
            view[: len(head)] = head
            sink.give(view[: len(head)])
            done = len(head)
        while done < length:
            # Fill whole buffers: TLS hands over 16 KiB per call, and fewer,
            # larger chunks cost less to pass on and to hash.
            view = sink.take()
            want = min(len(view), length - done)
            got = 0
            try:
                while got < want:
                    n = self._recv_into(view[got:want])
                    if n == 0:
                        raise Truncated(done + got, length)
                    got += n
            finally:
                # What arrived is kept even if the rest never does (resume).
                if got:
                    sink.give(view[:got])
            done += got

    def send(self, data: memoryview | bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise _failed(self.name, "send failed", e) from e


class Sink(Protocol):
    """Where C{Connection.receive} puts a body."""

    def take(self) -> memoryview:
        """A buffer to receive the next chunk into."""

    def give(self, data: memoryview) -> None:
        """C{data}, the start of a buffer from C{take}, has arrived."""


class Direct:
    """A C{Sink} that hands each chunk to C{consume} at once."""

    def __init__(
        self, consume: Callable[[memoryview], object], size: int = CHUNK
    ) -> None:
        self.consume = consume
        self.buffer = memoryview(bytearray(max(1, size)))

    def take(self) -> memoryview:
        return self.buffer

    def give(self, data: memoryview) -> None:
        self.consume(data)

    def close(self) -> None:
        """Nothing is pending: every chunk was consumed when given."""

    def __enter__(self) -> Direct:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def sink_for(
    consume: Callable[[memoryview], object], length: int | None
) -> Direct | Pipeline:
    """
    A C{Pipeline} for a body of C{length} bytes (or unknown), or for a
    body that fits in one buffer, a C{Direct} no larger than it: a tree of
    small files then costs no thread and no 4 MiB of buffers per file.
    """
    if length is not None and length <= CHUNK:
        return Direct(consume, length)
    return Pipeline(consume)


class Pipeline:
    """
    A C{Sink} that runs C{consume} (hash, write) in a worker thread while
    the next chunk is received: hashlib, os.write and recv_into release the
    GIL, so on two cores the two overlap (about 1.4 against 1.1 GiB/s on
    loopback).  Chunks are consumed in order; an error from C{consume}
    comes back from the next C{take} or from C{close}.
    """

    def __init__(self, consume: Callable[[memoryview], object], depth: int = 4):
        self.consume = consume
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(memoryview(bytearray(CHUNK)))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def take(self) -> memoryview:
        view = self._free.get()
        if self._error is not None:
            raise self._error
        return view

    def give(self, data: memoryview) -> None:
        self._full.put(data)

    def close(self) -> None:
        """Wait until every chunk given is consumed; raise what C{consume} did."""
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        # On the way out of an error, stop the worker without raising again.
        self._full.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (data := self._full.get()) is not None:
            if self._error is None:
                try:
                    self.consume(data)
                except BaseException as e:
                    self._error = e
            # Hand the whole buffer back, not just the filled slice.
            self._free.put(memoryview(data.obj))


def _parsed(parse: Callable[[str], _T], text: str) -> _T:
    """C{parse(text)}; a C{ProtocolError} saying what was wrong if it fails."""
    try:
        return parse(text)
    except codec.CodecError as e:
        raise ProtocolError(f"{e.what}: {sanitise(e.text, REPLY)!r}") from None


class FileClient:
    """Requests over one framed-mode connection, one at a time."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        #: why the server cut the last listing short ("" if it did not)
        self.truncated = ""

    def stat(self, path: str) -> Found:
        self.connection.send_line(f"STAT {quote(path)}")
        return _parsed(codec.parse_stat, self.connection.answer())

    def sum(self, path: str) -> tuple[str, int, int]:
        """(hex SHA-256, size, mtime) of a file."""
        self.connection.send_line(f"SUM {quote(path)}")
        answer = _parsed(codec.parse_sum, self.connection.answer())
        return answer.sha256, answer.size, answer.mtime

    def list(self, path: str | None) -> Iterator[Entry]:
        """
        The entries of a directory, as the server sends them; afterwards
        L{truncated} says why the server listed only some, if it did.
        """
        line = "LIST" if path is None else f"LIST {quote(path)}"
        self.truncated = ""
        self.connection.send_line(line)
        self.connection.answer()
        while True:
            raw = self.connection.readline()
            try:
                item = codec.parse_list_line(raw)
            except codec.CodecError as e:
                raise ProtocolError(f"{e.what} {sanitise(e.text, REPLY)!r}") from None
            if isinstance(item, codec.ListEnd):
                return
            if isinstance(item, str):
                self.truncated = sanitise(item, REPLY)
                continue
            yield item

    def get(self, path: str, offset: int = 0) -> Transfer:
        """Ask for a file from C{offset}; the body follows (see C{receive})."""
        self.connection.send_line(
            f"GET {quote(path)} {offset}" if offset else f"GET {quote(path)}"
        )
        transfer = _parsed(codec.parse_get, self.connection.answer())
        if offset + transfer.length > transfer.size:
            raise ProtocolError(
                f"GET announced {transfer.length} bytes from {offset} "
                f"of a {transfer.size}-byte file"
            )
        return transfer

    def put(self, path: str, length: int) -> None:
        """Announce an upload; the body follows (C{Connection.send})."""
        self.connection.send_line(f"PUT {quote(path)} {length}")
        _parsed(codec.parse_ready, self.connection.answer())

    def stored(self) -> tuple[int, str]:
        """The server's (length, hex SHA-256) once an upload is complete."""
        stored = _parsed(codec.parse_stored, self.connection.answer())
        return stored.length, stored.sha256
