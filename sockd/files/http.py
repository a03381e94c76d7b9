"""
HTTP/1.1 (RFC 9110, 9112) on the file port, through twisted.web.

A connection whose first line is an HTTP/1.x request line
(L{sockd.files.codec.HttpStart}) is handed to a L{FileChannel}, a
L{twisted.web.http.HTTPChannel}: it takes the transport and the bytes
already received, and parses every request.  L{FileRequest} answers them
from the same L{sockd.files.state.FileState} as the framed protocol: the
jail, the name policies, the pacer, uploads through
L{FileState.begin_upload}.  File bodies go out through the sendfile
producer on the raw transport (the chunk producer under TLS), after
twisted.web has written the headers.  Request bodies (C{PUT}) go straight
into the L{Upload} as they arrive: never buffered whole.

The connection stays a L{sockd.core.limits.GuardedProtocol} (the
L{HttpOwner}): caps, timers, access lists and the connection's log line
are its, and it feeds the channel what it reads.
"""

from __future__ import annotations

import base64
import html
import io
import math
import mimetypes
import os
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers

from sockd.core.logs import escape
from sockd.files import codec
from sockd.files.paths import Opened, PathError
from sockd.files.sendfile import TransferError, send_file
from sockd.files.state import (
    Entry,
    FileState,
    Peer,
    Upload,
    store_failure,
    write_code,
)

__all__ = [
    "UNSATISFIABLE",
    "FileChannel",
    "FileRequest",
    "HtmlIndex",
    "HttpOwner",
    "TextIndex",
    "content_type",
    "entity_tag",
    "parse_range",
    "refusal",
]

log = Logger(namespace="sockd.file")

#: L{parse_range}'s answer for a range that starts beyond the end
UNSATISFIABLE = (-1, -1)
#: pipelined requests answered for one connection in one reactor turn (as
#: the framed protocol's REQUESTS_PER_TURN); the rest wait for the next
REQUESTS_PER_TURN = 64
#: methods answered, for the metrics' label (any other is "other")
METHODS = frozenset({"GET", "HEAD", "PUT"})
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    429: "Too Many Requests",
}


class HttpOwner(Protocol):
    """What a L{FileChannel} needs of the connection it serves."""

    factory: Any
    transport: Any
    bytes_out: int
    requests: int
    request: str
    closing: bool

    def touch(self) -> None: ...
    def progress(self, count: int) -> None: ...
    def peer(self) -> Peer: ...
    def startDeadline(self) -> None: ...
    def stopDeadline(self) -> None: ...
    def close(self, message: bytes = b"") -> None: ...


#: makes the producer that writes a listing (L{sockd.files.protocol.ListSender})
Lister = Callable[..., Any]


def refusal(code: int, reason: str) -> bytes:
    """A whole response refusing a connection (before any request), then close."""
    body = f"{code} {reason}\n".encode()
    return (
        f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def content_type(name: str) -> bytes:
    """
    The type by the name's suffix (C{mimetypes}), else
    C{application/octet-stream}.  No charset: a file's encoding is unknown.
    """
    kind, encoding = mimetypes.guess_type(name, strict=False)
    if kind is None or encoding is not None:
        # A compressed file (.gz) is served as it is, not as its content.
        return b"application/octet-stream"
    return kind.encode("ascii")


def entity_tag(info: os.stat_result) -> bytes:
    """A strong ETag: inode, size and modification time in ns, in hex."""
    return b'"%x-%x-%x"' % (info.st_ino, info.st_size, info.st_mtime_ns)


def parse_range(value: bytes, size: int) -> tuple[int, int] | None:
    """
    A C{Range} header (RFC 9110 14.2) against a file of C{size} bytes: the
    first and last byte of a single satisfiable range, L{UNSATISFIABLE}, or
    None to send the whole file (not bytes, bad syntax, several ranges).
    """
    unit, _, spec = value.partition(b"=")
    if unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first, dash, last = spec.strip().partition(b"-")
    if not dash or not (first or last):
        return None
    if not all(part.isdigit() for part in (first, last) if part):
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return UNSATISFIABLE
    return start, min(end, size - 1)


def _http_date(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(seconds))


class HtmlIndex:
    """A directory as an HTML page: a parent link, then name, size, date."""

    def __init__(self, path: str) -> None:
        title = html.escape(path)
        parent = (
            ""
            if path == "/"
            else '<tr><td><a href="../">../</a></td><td></td><td></td></tr>\n'
        )
        self.head = (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f"<title>Index of {title}</title>"
            "<style>body{font-family:sans-serif;margin:2em}"
            "td{padding:0 1em 0 0}td+td{text-align:right}</style>"
            f"</head><body>\n<h1>Index of {title}</h1>\n"
            "<table>\n<tr><th>Name</th><th>Size</th><th>Modified (UTC)</th></tr>\n"
            f"{parent}"
        ).encode()

    def lines(self, entries: list[Entry]) -> bytes:
        rows = []
        for kind, name, info in entries:
            slash = "/" if kind == "d" else ""
            href = urllib.parse.quote(name, safe="") + slash
            size = "-" if kind == "d" else str(info.st_size)
            rows.append(
                f'<tr><td><a href="{href}">{html.escape(name)}{slash}</a></td>'
                f"<td>{size}</td><td>{_http_date(info.st_mtime)}</td></tr>\n"
            )
        return "".join(rows).encode("utf-8")

    def end(self, truncated: str) -> bytes:
        note = f"<p>truncated: {html.escape(truncated)}</p>\n" if truncated else ""
        return f"</table>\n{note}</body></html>\n".encode()


class TextIndex:
    """A directory as text: one name a line, a directory with a C{/}."""

    head = b""

    def lines(self, entries: list[Entry]) -> bytes:
        return "".join(
            f"{name}/\n" if kind == "d" else f"{name}\n" for kind, name, _ in entries
        ).encode("utf-8")

    def end(self, truncated: str) -> bytes:
        return f"# truncated: {truncated}\n".encode() if truncated else b""


class FileRequest(http.Request):
    """One HTTP request on a L{FileChannel}: GET, HEAD, or PUT."""

    channel: FileChannel
    #: the request line's method and target, known from the end of the
    #: headers (twisted.web sets C{method} and C{uri} only after the body)
    announced = b""
    target = b""
    version = b"HTTP/1.1"
    #: answered and closing before the body (a refused PUT)
    refused = False
    upload: Upload | None = None
    replaces = False
    #: the headers are in (L{gotLength})
    headed = False
    _sender: Any = None

    # --- what twisted.web calls -------------------------------------------

    def announce(self, method: bytes, target: bytes, version: bytes) -> None:
        self.announced, self.target, self.version = method, target, version

    def gotLength(self, length: int | None) -> None:
        """The headers are in: a PUT's upload begins; other bodies are refused."""
        self.headed = True
        self.channel.owner.stopDeadline()
        # Never written to: the body goes into the upload, or nowhere.
        self.content = io.BytesIO()
        if self.announced == b"PUT":
            if self.channel.owner.factory.draining:
                self._refuse(503, "shutting down")
            elif length is None:
                self._refuse(411, "a PUT needs a Content-Length (no chunked uploads)")
            else:
                self._beginUpload(length)
        elif length is None or length > 0:
            self._refuse(
                413, "only PUT may carry a request body", allow=self._allowed()
            )

    def handleContentChunk(self, data: bytes) -> None:
        upload = self.upload
        if upload is None or self.refused:
            return
        try:
            upload.feed(data)
        except OSError as e:
            self._abortUpload()
            self._refuse(write_code(e), f"cannot write: {e.strerror}")

    def process(self) -> None:
        if self.refused:
            return
        if self.channel.spent():
            # Many pipelined answers this turn: the other connections first.
            self.state.clock.callLater(0, self._resume)
            return
        self._process()

    def _resume(self) -> None:
        if not self._disconnected:
            self._process()

    def _process(self) -> None:
        owner = self.channel.owner
        owner.requests += 1
        owner.request = f"{self.method.decode('latin-1')} {escape(self.uri)}"
        if owner.factory.draining and self.upload is None:
            # Stopping: an upload in flight is finished, nothing new begun.
            self.fail(503, "shutting down", close=True)
            return
        if self.method == b"PUT":
            self._commit()
        elif self.method in (b"GET", b"HEAD"):
            try:
                self._get()
            except PathError as e:
                self.fail(e.code, e.reason)
            except OSError as e:
                self.fail(500, f"internal error: {e.strerror}", close=True)
        else:
            self.fail(405, "method not allowed", allow=self._allowed())

    def finish(self) -> None:
        self._count()
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        self._abortUpload()
        super().connectionLost(reason)

    # --- answers ------------------------------------------------------------

    @property
    def state(self) -> FileState:
        state: FileState = self.channel.owner.factory.state
        return state

    def _allowed(self) -> bytes:
        return b"GET, HEAD, PUT" if self.state.settings.writable else b"GET, HEAD"

    def _count(self) -> None:
        method = (self.method or self.announced).decode("latin-1")
        key = (method if method in METHODS else "other", self.code)
        counts = self.state.http_requests
        counts[key] = counts.get(key, 0) + 1

    def fail(
        self, code: int, reason: str, close: bool = False, allow: bytes = b""
    ) -> None:
        """Answer C{code} with a short text body (and C{Allow}), then finish."""
        self._error(code, reason, close, allow)
        self.finish()

    def _error(self, code: int, reason: str, close: bool, allow: bytes) -> None:
        owner = self.channel.owner
        refused = self.state.refused
        refused[code] = refused.get(code, 0) + 1
        log.info(
            "file: {peer} HTTP {method} {path}: {code} {reason}",
            peer=getattr(owner, "_key", None),
            method=escape(self.method or self.announced, 20),
            path=escape(self.uri or self.target),
            code=code,
            reason=reason,
        )
        body = f"{code} {reason}\n".encode()
        self.setResponseCode(code)
        self.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        self.setHeader(b"Content-Length", b"%d" % len(body))
        if allow:
            self.setHeader(b"Allow", allow)
        if close:
            self.setHeader(b"Connection", b"close")
            self.channel.persistent = False
        self.write(body)

    def _refuse(self, code: int, reason: str, allow: bytes = b"") -> None:
        """
        Answer before the body is read (twisted.web gives the method only
        after it), and close: the client may be sending it already.
        """
        self.refused = True
        self.method, self.uri, self.clientproto = (
            self.announced,
            self.target,
            self.version,
        )
        # No "100 Continue" after the answer: the body is not wanted.
        self.requestHeaders.removeHeader(b"Expect")
        self._error(code, reason, True, allow)
        self._count()
        self.channel.owner.close()

    # --- GET and HEAD ---------------------------------------------------------

    def _get(self) -> None:
        path = self.path
        if not path.startswith(b"/"):
            raise PathError(400, "the target must be a path starting with /")
        raw = codec.percent_decode(path)
        parts, opened = self.state.open(raw)
        if opened.is_dir:
            if not path.endswith(b"/"):
                opened.close()
                self._redirect(path + b"/")
                return
            self._index(parts, opened)
            return
        self._file(parts[-1], opened)

    def _redirect(self, location: bytes) -> None:
        query = self.uri.partition(b"?")[2]
        if query:
            location += b"?" + query
        body = b"moved to " + location + b"\n"
        self.setResponseCode(http.MOVED_PERMANENTLY)
        self.setHeader(b"Location", location)
        self.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()

    def _file(self, name: str, opened: Opened) -> None:
        info = opened.stat
        size = info.st_size
        tag = entity_tag(info)
        self.setHeader(b"Accept-Ranges", b"bytes")
        self.setHeader(b"Content-Type", content_type(name))
        known = self.state.known_sum(info)
        if known is not None:
            digest = base64.b64encode(bytes.fromhex(known))
            self.setHeader(b"Repr-Digest", b"sha-256=:" + digest + b":")
            # The older header (RFC 3230), for the clients that read only it.
            self.setHeader(b"Digest", b"SHA-256=" + digest)
        # If-None-Match, when sent, decides alone (RFC 9110 13.2.2).
        matching = self.getHeader(b"If-None-Match")
        if matching is not None:
            # A list may be written "a", "b": twisted.web splits on spaces.
            self.requestHeaders.setRawHeaders(
                b"If-None-Match", [matching.replace(b",", b" ")]
            )
        if self.setETag(tag) is http.CACHED:
            opened.close()
            self.finish()
            return
        if matching is None:
            if self.setLastModified(info.st_mtime) is http.CACHED:
                opened.close()
                self.finish()
                return
        else:
            self.setHeader(
                b"Last-Modified", http.datetimeToString(math.ceil(info.st_mtime))
            )
        offset, count = 0, size
        wanted = self.getHeader(b"Range") if self.method == b"GET" else None
        if wanted is not None and self._rangeApplies(tag, info):
            chosen = parse_range(wanted, size)
            if chosen == UNSATISFIABLE:
                opened.close()
                self.setHeader(b"Content-Range", b"bytes */%d" % size)
                self.fail(416, f"range not satisfiable ({size} bytes)")
                return
            if chosen is not None:
                first, last = chosen
                offset, count = first, last - first + 1
                self.setResponseCode(http.PARTIAL_CONTENT)
                self.setHeader(
                    b"Content-Range", b"bytes %d-%d/%d" % (first, last, size)
                )
        self.setHeader(b"Content-Length", b"%d" % count)
        self.write(b"")  # the headers, through twisted.web
        if self.method == b"HEAD" or count == 0:
            opened.close()
            self.finish()
            return
        self._send(opened, offset, count)

    def _rangeApplies(self, tag: bytes, info: os.stat_result) -> bool:
        """C{If-Range} (RFC 9110 13.1.5): the range only if the validator matches."""
        condition = self.getHeader(b"If-Range")
        if condition is None:
            return True
        condition = condition.strip()
        if condition.startswith(b'"'):
            return condition == tag
        try:
            when = http.stringToDatetime(condition)
        except ValueError:
            return False
        return bool(when == math.ceil(info.st_mtime))

    def _send(self, opened: Opened, offset: int, count: int) -> None:
        """The body by the file producers, on the raw transport; then finish."""
        owner = self.channel.owner
        state = self.state
        transport = owner.transport
        # The channel is the transport's producer between bodies; the sender
        # takes its place meanwhile, as it needs the transport itself.
        transport.unregisterProducer()

        sender, result = send_file(
            transport,
            opened.fd,
            offset,
            count,
            state.clock,
            state.pacer(),
            owner.progress,
            state.use_sendfile,
        )
        self._sender = sender
        self._afterBody(result, served=True)

    def _afterBody(self, result: Deferred[int], served: bool = False) -> None:
        owner = self.channel.owner
        channel = self.channel
        transport = owner.transport

        def sent(_: int) -> None:
            self._sender = None
            if served:
                self.state.served += 1
            if self._disconnected or owner.closing:
                return
            transport.registerProducer(channel, True)
            self.finish()

        def failed(failure: Failure) -> None:
            self._sender = None
            error = failure.value
            if self._disconnected:
                return
            if isinstance(error, PathError) and not self.startedWriting:
                transport.registerProducer(channel, True)
                self.fail(error.code, error.reason, close=True)
                return
            if not isinstance(error, TransferError | PathError):
                log.failure("file: HTTP transfer failed", failure)
            else:
                log.info(
                    "file: {peer}: HTTP transfer ended early: {error}",
                    peer=getattr(owner, "_key", None),
                    error=str(error),
                )
            self._count()
            owner.close()

        result.addCallbacks(sent, failed)

    def _index(self, parts: tuple[str, ...], opened: Opened) -> None:
        """
        A directory: HTML, or text with C{?format=text} or when C{Accept}
        names C{text/plain} and not C{text/html}; a slice per turn.
        """
        accept = (self.getHeader(b"Accept") or b"").lower()
        text = self.args.get(b"format") == [b"text"] or (
            b"text/plain" in accept and b"text/html" not in accept
        )
        self.setHeader(b"Vary", b"Accept")
        self.setHeader(
            b"Content-Type",
            b"text/plain; charset=utf-8" if text else b"text/html; charset=utf-8",
        )
        if self.method == b"HEAD":
            opened.close()
            self.finish()
            return
        where = "/" + "".join(name + "/" for name in parts)
        form = TextIndex() if text else HtmlIndex(where)
        owner = self.channel.owner
        state = self.state
        scan = state.scan(parts, opened)
        transport = owner.transport
        transport.unregisterProducer()
        sender = self.channel.lister(scan, form, state.clock, self.write, owner.touch)
        self._sender = sender
        self._afterBody(sender.start(transport))

    # --- PUT ------------------------------------------------------------------

    def _beginUpload(self, length: int) -> None:
        state = self.state
        target = self.target.partition(b"?")[0]
        try:
            if not target.startswith(b"/"):
                raise PathError(400, "the target must be a path starting with /")
            raw = codec.percent_decode(target)
            # Through the same door as the framed PUT: its rules and limits.
            upload = state.begin_upload(raw, length, self.channel.owner.peer())
        except PathError as e:
            self._refuse(e.code, e.reason)
            return
        except OSError as e:
            self._refuse(500, f"internal error: {e.strerror}")
            return
        self.upload = upload
        try:
            os.stat(upload.name, dir_fd=upload.dir_fd, follow_symlinks=False)
        except OSError:
            self.replaces = False
        else:
            self.replaces = True

    def _abortUpload(self) -> None:
        upload, self.upload = self.upload, None
        if upload is not None:
            self.state.release(upload)
            upload.abort()

    def _commit(self) -> None:
        upload, self.upload = self.upload, None
        assert upload is not None
        state = self.state
        state.release(upload)
        # Not cancelled if the client goes: the file is complete.
        work = state.blocking(upload.commit)

        def done(_: None) -> None:
            if self._disconnected:
                return
            hexdigest = upload.hash.hexdigest()
            self.setResponseCode(http.NO_CONTENT if self.replaces else http.CREATED)
            self.setHeader(
                b"Repr-Digest",
                b"sha-256=:" + base64.b64encode(bytes.fromhex(hexdigest)) + b":",
            )
            if self.replaces:
                self.finish()
                return
            body = f"stored {upload.length} bytes sha256={hexdigest}\n".encode()
            self.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            self.setHeader(b"Content-Length", b"%d" % len(body))
            self.write(body)
            self.finish()

        def failed(failure: Failure) -> None:
            upload.abort()
            code, reason = store_failure(failure)
            if not self._disconnected:
                self.fail(code, reason, close=True)

        work.addCallbacks(done, failed)


class FileChannel(http.HTTPChannel):
    """
    twisted.web's HTTP/1.1 channel serving one sockd-file connection: its
    own idle timer is off (the L{HttpOwner}'s timers apply), and the first
    line of each request is noted for L{FileRequest.gotLength}.
    """

    requestFactory = FileRequest
    timeOut = None

    def __init__(self, owner: HttpOwner, lister: Lister) -> None:
        super().__init__()
        self.owner = owner
        self.lister = lister
        #: the peer has sent all it will: close once the answer is out
        self.ended = False
        #: requests begun in this reactor turn (L{spent})
        self._answered = 0

    @classmethod
    def attach(cls, owner: HttpOwner, lister: Lister, data: bytes) -> FileChannel:
        """Take over C{owner}'s transport and parse C{data}, already received."""
        transport = owner.transport
        # The transport was its own producer; the channel takes that place.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        channel = cls(owner, lister)
        channel.makeConnection(transport)
        if ITCPTransport.providedBy(transport):
            # twisted.web sets TCP_NODELAY; bulk bodies are faster without.
            transport.setTcpNoDelay(False)
        if data:
            channel.received(data)
        return channel

    def spent(self) -> bool:
        """Count a request; whether this turn's share is used up."""
        if not self._answered:
            self.owner.factory.clock.callLater(0, self._newTurn)
        self._answered += 1
        return self._answered > REQUESTS_PER_TURN

    def _newTurn(self) -> None:
        self._answered = 0

    def received(self, data: bytes) -> None:
        """Bytes from the client (counted and timed by the owner)."""
        if not self.requests or not self.requests[-1].headed:
            # A request's head must be complete within request_timeout.
            self.owner.startDeadline()
        self.dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        before = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > before:
            # twisted.web has checked the line; its method and target are
            # wanted before the body, when a PUT's upload begins.
            method, _, rest = line.partition(b" ")
            target, _, version = rest.rpartition(b" ")
            self.requests[-1].announce(method, target, version)

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Any
    ) -> None:
        # Twisted 24.3 passes (name, value) pairs; later releases a Headers.
        pairs = (
            [(n, v) for n, values in headers.getAllRawHeaders() for v in values]
            if isinstance(headers, Headers)
            else headers
        )
        self.owner.bytes_out += (
            16 + len(reason) + sum(len(name) + len(value) + 4 for name, value in pairs)
        )
        super().writeHeaders(version, code, reason, headers)

    def write(self, data: bytes) -> None:
        self.owner.bytes_out += len(data)
        super().write(data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.owner.bytes_out += sum(map(len, iovec))
        super().writeSequence(iovec)

    def requestDone(self, request: http.Request) -> None:
        super().requestDone(request)
        owner = self.owner
        if owner.closing:
            return
        if (self.ended or owner.factory.draining) and not self.requests:
            owner.close()

    def inputEnded(self) -> None:
        """The client half-closed: close once the answers are written."""
        self.ended = True
        if not self.requests:
            self.owner.close()

    def shutdown(self) -> None:
        """The daemon is stopping: finish the request in flight, then close."""
        self.persistent = False
        if not self.requests:
            self.owner.close()
