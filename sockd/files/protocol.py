"""
sockd-file: a file server simple enough for netcat, in the family of Gopher
(RFC 1436) and TFTP.  The wire protocol is in C{docs/protocol-file.md}.

 - Bare mode: one selector line (or bytes ended by a pause or half-close),
   the file's bytes back, then close; a directory gets a Gopher menu.
 - Framed mode, chosen by a first line starting with a keyword: C{GET},
   C{STAT}, C{SUM}, C{LIST}, C{HELP}, C{QUIT} and, when writable, C{PUT},
   several on one connection.

L{FileProtocol} is I/O only: bytes go through L{sockd.files.codec} to
events, and answers back through it to bytes; L{sockd.files.state.FileState}
holds the decisions.  File bodies go out through L{sockd.files.sendfile}.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockd.core.config import Config
from sockd.core.eager import eager_write
from sockd.core.interfaces import IReconfigurable
from sockd.core.limits import ACCESS_DENIED, GuardedFactory, GuardedProtocol, Sample
from sockd.core.logs import escape
from sockd.files import codec, gopher
from sockd.files.http import FileChannel
from sockd.files.http import refusal as http_refusal
from sockd.files.paths import Opened, PathError
from sockd.files.sendfile import SendfileProducer, TransferError, release, send_file
from sockd.files.state import (
    Entry,
    FileState,
    Peer,
    Upload,
    store_failure,
    write_code,
)

__all__ = ["REQUESTS_PER_TURN", "FileFactory", "FileProtocol", "ListSender"]

log = Logger(namespace="sockd.file")

_SHUTTING_DOWN = codec.send(codec.Failure(503, "shutting down"))

#: pipelined requests answered for one connection in one reactor turn
REQUESTS_PER_TURN = 64


def _number(text: bytes) -> int:
    if not text.isdigit() or len(text) > 19:
        raise PathError(400, f"expected a whole number, not {escape(text, 40)}")
    return int(text)


class _ListFormat:
    """A framed C{LIST} answer: C{OK}, C{<f|d> <size> <mtime> <name>} lines, C{.}."""

    head = codec.send(codec.Ok())

    def lines(self, entries: list[Entry]) -> bytes:
        return b"".join(
            codec.send(
                codec.ListLine(
                    kind, info.st_size, int(info.st_mtime), name.encode("utf-8")
                )
            )
            for kind, name, info in entries
        )

    def end(self, truncated: str) -> bytes:
        return codec.send(codec.ListEnd(truncated))


#: an entry of a listing: a framed LIST's L{Entry}, or a menu's L{gopher.Item}
T = TypeVar("T")


class _Scan(Protocol[T]):
    """A listing worked out a slice at a time (L{DirectoryScan}, L{MenuScan})."""

    done: bool
    truncated: str

    @property
    def started(self) -> bool: ...

    def step(self) -> list[T]: ...

    def close(self) -> None: ...


class _Format(Protocol[T]):
    """How a listing is written: a head, its entries' lines, its end."""

    head: bytes

    def lines(self, entries: list[T]) -> bytes: ...

    def end(self, truncated: str) -> bytes: ...


@implementer(IPushProducer)
class ListSender(Generic[T]):
    """
    Writes a listing (a L{DirectoryScan} for C{LIST}, a L{MenuScan} for a
    Gopher menu) as the transport's push producer:
    one slice per reactor turn while the transport has room, nothing while
    it is paused (a client that does not read), then the end line.  Like
    the file senders: L{start} gives a L{Deferred} of the bytes written,
    and the scan is released whatever happens.
    """

    def __init__(
        self,
        scan: _Scan[T],
        form: _Format[T],
        clock: IReactorTime,
        write: Callable[[bytes], None],
        progress: Callable[[], None],
    ) -> None:
        self.scan = scan
        self.form = form
        self.clock = clock
        self.write = write
        self.progress = progress
        self.transport: Any = None
        self.deferred: Deferred[int] = Deferred()
        self.sent = 0
        self.done = False
        self.paused = False
        self._begun = False
        self._call: IDelayedCall | None = None

    def start(self, transport: Any) -> Deferred[int]:
        """Register with C{transport}; the first slice goes on the next turn."""
        self.transport = transport
        transport.registerProducer(self, True)
        if not self.done:
            self._call = self.clock.callLater(0, self._step)
        return self.deferred

    def _step(self) -> None:
        self._call = None
        if self.done or self.paused:
            return
        transport = self.transport
        if getattr(transport, "disconnecting", False) or getattr(
            transport, "disconnected", False
        ):
            self._finish(TransferError("connection closing", self.sent))
            return
        try:
            entries = self.scan.step()
        except OSError as e:
            reason = f"internal error: {e.strerror}"
            # Nothing written yet: the client can still get an ERR line.
            self._finish(
                TransferError(reason, self.sent)
                if self._begun
                else PathError(500, reason)
            )
            return
        data = b""
        if not self._begun and self.scan.started:
            data = self.form.head  # once every name is read: no more ERR
            self._begun = True
        data += self.form.lines(entries)
        if self.scan.done:
            data += self.form.end(self.scan.truncated)
        if data:
            self.sent += len(data)
            self.write(data)  # may pause us: the transport's buffer is full
            self.progress()
        if self.scan.done:
            self._finish(None)
        elif not self.paused and not self.done:
            self._call = self.clock.callLater(0, self._step)

    def _finish(self, error: Exception | None, unregister: bool = True) -> None:
        if self.done:
            return
        self.done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.scan.close()
        if unregister:
            release(self.transport, self)
        if error is None:
            self.deferred.callback(self.sent)
        else:
            self.deferred.errback(error)

    def pauseProducing(self) -> None:
        self.paused = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def resumeProducing(self) -> None:
        """The transport has room again: the next slice, now."""
        self.paused = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._step()

    def stopProducing(self) -> None:
        """The connection is gone."""
        self._finish(TransferError("connection lost", self.sent), unregister=False)


class Phase(enum.Enum):
    """Where a connection is; L{TRANSITIONS} says where it may go next."""

    #: reading requests, none being answered
    IDLE = "idle"
    #: many pipelined requests answered: the rest on the next reactor turn
    YIELDING = "yielding"
    #: a PUT's body arriving
    UPLOADING = "uploading"
    #: a producer writing a file body or a listing
    STREAMING = "streaming"
    #: a checksum, or an upload's commit, under way
    WORKING = "working"
    #: closing: no more requests
    CLOSING = "closing"
    #: the connection is gone
    LOST = "lost"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset(
        {
            Phase.IDLE,
            Phase.YIELDING,
            Phase.UPLOADING,
            Phase.STREAMING,
            Phase.WORKING,
            Phase.CLOSING,
            Phase.LOST,
        }
    ),
    Phase.YIELDING: frozenset({Phase.IDLE, Phase.CLOSING, Phase.LOST}),
    Phase.UPLOADING: frozenset({Phase.WORKING, Phase.CLOSING, Phase.LOST}),
    Phase.STREAMING: frozenset({Phase.IDLE, Phase.CLOSING, Phase.LOST}),
    Phase.WORKING: frozenset({Phase.IDLE, Phase.CLOSING, Phase.LOST}),
    Phase.CLOSING: frozenset({Phase.CLOSING, Phase.LOST}),
    Phase.LOST: frozenset({Phase.LOST}),
}
#: phases in which the next request (or body bytes) may be taken
_READING = frozenset({Phase.IDLE, Phase.UPLOADING})
#: events that count as requests for L{REQUESTS_PER_TURN}
_REQUESTS = (codec.Request, codec.BareRequest, codec.LineTooLong)


class IllegalTransition(RuntimeError):
    """A connection asked to go from one phase to one it may not."""


class FileProtocol(GuardedProtocol):
    """One connection: a bare request, or framed requests one after another."""

    # Bodies go out in sendfile() calls of 256 KiB: with TCP_NODELAY each
    # call's tail leaves as a segment of its own, which is slower
    # (docs/performance.md, "File bodies without TCP_NODELAY").
    nodelay = False

    factory: FileFactory
    phase = Phase.IDLE
    #: the daemon is stopping: close once the request in flight is answered
    _draining = False
    #: in the request loop (an answer that completes at once re-enters it)
    _processing = False
    #: a request taken from the parser, answered after a yield
    _held: codec.Event | None = None
    _yield: IDelayedCall | None = None
    _pause: IDelayedCall | None = None
    _upload: Upload | None = None
    _sender: Any = None
    _work: Deferred[Any] | None = None
    #: twisted.web's channel, once the connection speaks HTTP (L{_startHttp})
    _http: FileChannel | None = None
    #: the bare request came as Gopher clients send one: errors are items
    _gopher = False

    def __init__(self) -> None:
        super().__init__()
        self._parser = codec.RequestParser()

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.factory.http_only:
            self._startHttp(b"")

    @property
    def mode(self) -> str:
        """C{""} until the first request, then C{"bare"} or C{"framed"}."""
        mode = self._parser.mode
        return "" if mode is codec.Mode.UNDECIDED else mode.value

    def _enter(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"{self.phase.name} to {phase.name}")
        self.phase = phase

    # --- input ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.phase is Phase.CLOSING or self.phase is Phase.LOST:
            return
        if not self.permitted():
            return  # refused by an access list changed on reload
        self.touch()
        self.bytes_in += len(data)
        if self._http is not None:
            if not self.closing:
                self._http.received(data)
            return
        self._parser.feed(data)
        if self.phase in _READING:
            self._process()
        elif self._parser.buffered > codec.MAX_LINE:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _process(self) -> None:
        # An answer that completes at once (a cached SUM, an empty file)
        # comes back here through _next: let the outer loop carry on rather
        # than recurse once per pipelined request.
        if self._processing:
            return
        self._processing = True
        try:
            self._processEvents()
        finally:
            self._processing = False

    def _processEvents(self) -> None:
        parser = self._parser
        answered = 0
        while self.phase in _READING:
            event, self._held = self._held or parser.next_event(), None
            if event is None:
                break
            if isinstance(event, _REQUESTS):
                if answered >= REQUESTS_PER_TURN:
                    # Many pipelined requests answered at once: give the
                    # other connections their turn, and go on at the next.
                    self._held = event
                    self._setBusy(Phase.YIELDING)
                    self._yield = self.factory.clock.callLater(0, self._continue)
                    return
                answered += 1
            self._handle(event)
        if self.phase is not Phase.IDLE:
            return
        waiting = parser.waiting()
        if waiting is codec.Waiting.PAUSE:
            # An absolute deadline for the line: trickling bytes does not
            # extend it.  A first line may also end with a pause (a client
            # that sends a name and no newline, as the classic tutorial's).
            self.startDeadline()
            self._startPause()
        elif waiting is codec.Waiting.LINE:
            self.startDeadline()
            # A pause started by bytes before the space no longer applies.
            self._cancelPause()

    def _handle(self, event: codec.Event) -> None:
        if isinstance(event, codec.Request | codec.BareRequest):
            self._cancelPause()
            self.stopDeadline()
            self._request(event)
        elif isinstance(event, codec.BodyData):
            self._uploadData(event.data)
        elif isinstance(event, codec.BodyEnd):
            self._uploaded()
        elif isinstance(event, codec.BodyIncomplete):
            self._abortUpload()
            self._error(
                400, "connection ended in the middle of an upload", b"PUT", close=True
            )
        elif isinstance(event, codec.HttpStart):
            self._startHttp(event.data)
        elif isinstance(event, codec.LineTooLong):
            self._error(
                414,
                f"request line longer than {codec.MAX_LINE} bytes",
                b"",
                close=True,
            )
        else:
            # The peer sent all it will, and all of it is answered.
            self._cancelPause()
            self.close()

    def _continue(self) -> None:
        self._yield = None
        self._next()

    def _startPause(self) -> None:
        pause = self.factory.state.settings.bare_pause
        if self._pause is not None and self._pause.active():
            self._pause.reset(pause)
        else:
            self._pause = self.factory.clock.callLater(pause, self._paused)

    def _cancelPause(self) -> None:
        if self._pause is not None and self._pause.active():
            self._pause.cancel()
        self._pause = None

    def _paused(self) -> None:
        self._pause = None
        if self.phase is Phase.IDLE:
            event = self._parser.pause()
            if event is not None:
                self.stopDeadline()
                self._request(event)
                self._process()

    def _startHttp(self, data: bytes) -> None:
        """HTTP/1.x: twisted.web's channel parses from here (L{sockd.files.http})."""
        self._cancelPause()
        self.stopDeadline()
        self._http = FileChannel.attach(self, ListSender, data)

    def inputEnded(self) -> None:
        if self._http is not None:
            self._http.inputEnded()
            return
        self._parser.end()
        if self.phase in _READING:
            self._process()

    # --- requests -------------------------------------------------------

    def _request(self, event: codec.Request | codec.BareRequest) -> None:
        if isinstance(event, codec.BareRequest):
            self._gopher = event.gopher
            self._bare(event.selector)
            return
        word, args, path = event.command, list(event.args), event.path
        handler = self._commands.get(word)
        if handler is None:
            self._error(400, "unknown command; send HELP for the list", word)
            return
        try:
            if event.spaced:
                raise PathError(400, "arguments are separated by single spaces")
            handler(self, args)
        except PathError as e:
            self._error(
                e.code, e.reason, word, path, close=word == b"PUT", cause=e.cause
            )
        except OSError as e:
            # Descriptor exhaustion (EMFILE), I/O errors: this request fails,
            # the daemon goes on.
            self._error(500, f"internal error: {e.strerror}", word, path, close=True)

    def _bare(self, selector: bytes) -> None:
        state = self.factory.state
        try:
            parts, opened = state.open(selector)
            if opened.is_dir:
                settings = state.settings
                address = self.transport.getHost()  # type: ignore[union-attr]
                form = gopher.MenuFormat(
                    *gopher.advertised(
                        settings.gopher_host,
                        settings.gopher_port,
                        getattr(address, "host", None),
                        getattr(address, "port", None),
                    )
                )
                menu = state.menu(parts, opened)
                self._listing(menu, form, self.close, b"", selector)
                return
        except PathError as e:
            self._error(e.code, e.reason, b"", selector, close=True, cause=e.cause)
            return
        except OSError as e:
            self._error(500, f"internal error: {e.strerror}", b"", selector)
            return
        self._log("bare", selector)
        self._send(opened, 0, opened.stat.st_size, self.close)

    def _get(self, args: list[bytes]) -> None:
        if not 1 <= len(args) <= 3:
            raise PathError(400, "usage: GET <path> [<offset> [<length>]]")
        offset = _number(args[1]) if len(args) > 1 else 0
        length = _number(args[2]) if len(args) > 2 else None
        _, opened = self.factory.state.open(codec.percent_decode(args[0]), "file")
        size = opened.stat.st_size
        if offset > size:
            opened.close()
            raise PathError(416, f"offset {offset} is beyond the end ({size} bytes)")
        count = size - offset if length is None else min(size - offset, length)
        mtime = int(opened.stat.st_mtime)
        self._log("GET", args[0])
        head = codec.send(codec.GetHeader(count, size, mtime))
        self._send(opened, offset, count, self._next, head)

    def _stat(self, args: list[bytes]) -> None:
        if len(args) != 1:
            raise PathError(400, "usage: STAT <path>")
        _, opened = self.factory.state.open(codec.percent_decode(args[0]))
        opened.close()
        info = opened.stat
        kind = "dir" if opened.is_dir else "file"
        self._write(
            codec.send(codec.StatAnswer(kind, info.st_size, int(info.st_mtime)))
        )

    def _sum(self, args: list[bytes]) -> None:
        if len(args) != 1:
            raise PathError(400, "usage: SUM <path>")
        _, opened = self.factory.state.open(codec.percent_decode(args[0]), "file")
        info = opened.stat
        self._setBusy(Phase.WORKING)
        work = self._work = self.factory.state.checksum(opened)

        def done(hexdigest: str) -> None:
            self._write(
                codec.send(codec.SumAnswer(hexdigest, info.st_size, int(info.st_mtime)))
            )

        def failed(failure: Failure) -> None:
            if self.phase is Phase.LOST:
                return  # cancelled: nobody to answer
            error = failure.value
            if not isinstance(error, PathError):
                log.failure("file: SUM failed", failure)
                error = PathError(500, "internal error")
            self._error(error.code, error.reason, b"SUM", args[0], cause=error.cause)

        work.addCallbacks(done, failed)
        work.addBoth(self._workDone)

    def _list(self, args: list[bytes]) -> None:
        if len(args) > 1:
            raise PathError(400, "usage: LIST [<dir>]")
        path = codec.percent_decode(args[0]) if args else b""
        state = self.factory.state
        parts, opened = state.open(path, "dir")
        scan = state.scan(parts, opened)
        self._listing(scan, _ListFormat(), self._next, b"LIST", path)

    def _listing(
        self,
        scan: _Scan[T],
        form: _Format[T],
        then: Callable[[], None],
        command: bytes,
        path: bytes,
    ) -> None:
        """Send a listing (C{scan}), a slice per turn; then C{then}."""
        state = self.factory.state

        def begin() -> tuple[ListSender[T], Deferred[int]]:
            sender = ListSender(scan, form, state.clock, self._write, self.touch)
            return sender, sender.start(self.transport)

        self._stream(begin, then, command, path)

    def peer(self) -> Peer:
        """Who is asking: the client's address and TLS certificate."""
        return Peer.of(self._host, self.transport)

    def _help(self, args: list[bytes]) -> None:
        self._write(codec.send(codec.Help()))

    def _quit(self, args: list[bytes]) -> None:
        self.close(codec.send(codec.Bye()))

    def _put(self, args: list[bytes]) -> None:
        if len(args) != 2:
            raise PathError(400, "usage: PUT <path> <length>")
        length = _number(args[1])
        upload = self.factory.state.begin_upload(
            codec.percent_decode(args[0]), length, self.peer()
        )
        self._upload = upload
        self._enter(Phase.UPLOADING)
        self._log("PUT", args[0])
        self._write(codec.send(codec.Ready()))
        self._parser.expect_body(length)

    _commands: dict[bytes, Callable[[FileProtocol, list[bytes]], None]] = {
        b"GET": _get,
        b"STAT": _stat,
        b"SUM": _sum,
        b"LIST": _list,
        b"HELP": _help,
        b"QUIT": _quit,
        b"PUT": _put,
    }

    # --- uploads --------------------------------------------------------

    def _uploadData(self, data: bytes) -> None:
        upload = self._upload
        assert upload is not None
        try:
            upload.feed(data)
        except OSError as e:
            self._abortUpload()
            self._error(
                write_code(e), f"cannot write: {e.strerror}", b"PUT", close=True
            )

    def _uploaded(self) -> None:
        upload, self._upload = self._upload, None
        assert upload is not None
        self.factory.state.release(upload)
        self._commit(upload)

    def _commit(self, upload: Upload) -> None:
        self._setBusy(Phase.WORKING)
        # Not kept in _work: a commit running in a thread is never cancelled
        # (the file is complete; it goes under its name even if the client
        # has gone).
        work = self.factory.state.blocking(upload.commit)

        def done(_: None) -> None:
            self._write(
                codec.send(codec.Stored(upload.length, upload.hash.hexdigest()))
            )

        def failed(failure: Failure) -> None:
            upload.abort()
            code, reason = store_failure(failure)
            self._error(code, reason, b"PUT", upload.name.encode(), close=True)

        work.addCallbacks(done, failed)
        work.addBoth(self._workDone)

    def _abortUpload(self) -> None:
        upload, self._upload = self._upload, None
        if upload is not None:
            self.factory.state.release(upload)
            upload.abort()

    # --- sending --------------------------------------------------------

    def _send(
        self,
        opened: Opened,
        offset: int,
        count: int,
        then: Callable[[], None],
        head: bytes = b"",
    ) -> None:
        """Send C{head}, then C{count} bytes of the file from C{offset}."""
        state = self.factory.state

        def begin() -> tuple[Any, Deferred[int]]:
            # The header goes with the body, so that both share the cork.
            self.bytes_out += len(head)
            sender, result = send_file(
                self.transport,
                opened.fd,
                offset,
                count,
                state.clock,
                state.pacer(),
                self.progress,
                state.use_sendfile,
                head,
            )
            return sender, result.addCallback(self._served)

        self._stream(begin, then, b"GET", b"")

    def _served(self, count: int) -> int:
        self.factory.state.served += 1
        return count

    def _stream(
        self,
        begin: Callable[[], tuple[Any, Deferred[int]]],
        then: Callable[[], None],
        command: bytes,
        path: bytes,
    ) -> None:
        """
        Hand the transport to a producer (a file body, a listing) until it
        is done, then call C{then}; requests that follow wait till then.
        """
        transport = self.transport
        self._setBusy(Phase.STREAMING)
        # The transport is registered as its own producer (backpressure on
        # reading); the sender takes that place meanwhile.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()  # type: ignore[union-attr]
        sender, result = begin()
        self._sender = sender

        def sent(count: int) -> None:
            self._sender = None
            self._zeroCopied(sender, count)
            if self.phase is Phase.STREAMING:
                self._resume()
                then()

        def failed(failure: Failure) -> None:
            self._sender = None
            error = failure.value
            if isinstance(error, PathError):
                # Failed before writing anything: the client hears why.
                if self.phase is not Phase.LOST:
                    self._error(
                        error.code,
                        error.reason,
                        command,
                        path,
                        close=True,
                        cause=error.cause,
                    )
                return
            if not isinstance(error, TransferError):
                log.failure("file: transfer failed", failure)
            else:
                self._zeroCopied(sender, error.sent)
            if isinstance(error, TransferError) and self.phase is not Phase.LOST:
                log.info(
                    "file: {peer}: transfer ended early: {error}",
                    peer=self._key,
                    error=str(error),
                )
            self.close()

        result.addCallbacks(sent, failed)

    def _zeroCopied(self, sender: object, count: int) -> None:
        """A transfer ended: count its bytes if they went with sendfile."""
        if isinstance(sender, SendfileProducer):
            self.factory.state.sendfile_bytes += count

    def progress(self, count: int) -> None:
        """C{count} more bytes of a body sent (framed, bare or HTTP)."""
        self.factory.state.bytes_sent += count
        self.bytes_out += count
        self.touch()  # a transfer that moves is not idle

    def _setBusy(self, phase: Phase) -> None:
        """Answering a request (C{phase}): read no more until it is done."""
        self._enter(phase)
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _resume(self) -> None:
        """The request is answered: read again."""
        self._enter(Phase.IDLE)
        transport: Any = self.transport
        if transport is not None:
            if getattr(transport, "producer", None) is None:
                transport.registerProducer(transport, True)
            transport.resumeProducing()

    def _workDone(self, result: object) -> None:
        self._work = None
        if self.phase is Phase.WORKING:
            self._next()

    def _next(self) -> None:
        if self.phase is Phase.CLOSING or self.phase is Phase.LOST:
            return
        if self._draining:
            # Stopping: the work in flight is done; take no more requests.
            self.close(_SHUTTING_DOWN)
            return
        self._resume()
        self._process()

    def close(self, message: bytes = b"") -> None:
        """
        Close as L{GuardedProtocol.close} does; an upload in progress is
        aborted at once, since no more of its body will be read.
        """
        self._abortUpload()
        if self.phase is not Phase.LOST:
            self._enter(Phase.CLOSING)
        super().close(message)

    def shutdown(self) -> None:
        """The daemon is stopping: finish a transfer or upload in flight."""
        if self.phase is Phase.CLOSING or self.phase is Phase.LOST:
            return
        if self.transport is None:
            return
        if self._http is not None:
            self._http.shutdown()
            return
        self._draining = True
        self._cancelPause()
        if self.phase is not Phase.IDLE:
            return  # _next (or the upload's end) closes afterwards
        if self.mode == "framed":
            self._write(_SHUTTING_DOWN)
        self._enter(Phase.CLOSING)
        super().shutdown()

    # --- answers --------------------------------------------------------

    def _error(
        self,
        code: int,
        reason: str,
        command: bytes,
        path: bytes = b"",
        close: bool = False,
        cause: str | None = None,
    ) -> None:
        refused = self.factory.state.refused
        refused[code] = refused.get(code, 0) + 1
        log.info(
            "file: {peer} {command} {path}: {code} {reason}",
            peer=self._key,
            command=escape(command or b"bare", 20),
            path=escape(path),
            code=code,
            reason=reason,
        )
        line = b""
        if self.mode == "bare" and self._gopher:
            line = gopher.error_item(code, reason)
        elif self.mode != "bare" or self.factory.state.settings.bare_errors == "line":
            line = codec.send(codec.Failure(code, reason, cause))
        if close or self.mode == "bare":
            self.close(line)
        elif line:
            self._write(line)

    def _write(self, data: bytes) -> None:
        # At once when nothing is queued: the file body that often follows
        # can then start in the same reactor turn.
        self.bytes_out += len(data)
        eager_write(self.transport, data)

    def _log(self, command: str, path: bytes) -> None:
        # Said in the connection's one line, at its end (GuardedProtocol).
        self.requests += 1
        self.request = f"{command} {escape(path)}"

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._enter(Phase.LOST)
        self._cancelPause()
        if self._yield is not None and self._yield.active():
            self._yield.cancel()
        if self._sender is not None and not self._sender.done:
            self._sender.stopProducing()
        self._sender = None
        if self._work is not None:
            self._work.cancel()
        self._abortUpload()
        if self._http is not None:
            self._http.connectionLost(reason)
        super().connectionLost(reason)


@implementer(IReconfigurable)
class FileFactory(GuardedFactory):
    """The file service under the limits of C{[file]}."""

    service_name = "file"
    protocol = FileProtocol  # type: ignore[assignment]

    def __init__(
        self,
        state: FileState,
        clock: IReactorTime,
        abort_grace: float = 5.0,
        http_only: bool = False,
        primary: bool = True,
    ) -> None:
        settings = state.settings
        super().__init__(
            clock,
            settings,
            request_timeout=settings.request_timeout,
            abort_grace=abort_grace,
        )
        self.state = state
        #: every connection speaks HTTP (C{listen_http})
        self.http_only = http_only
        #: the one factory of its state that sweeps and reports its counters
        self.primary = primary

    def refusal(self, reason: str) -> bytes:
        # An access list says who may connect at all: 403; every other
        # refusal (caps, eviction) is "try later": 429.
        code = 403 if reason == ACCESS_DENIED else 429
        if self.http_only:
            return http_refusal(code, reason)
        return f"ERR {code} {reason}\r\n".encode()

    def startFactory(self) -> None:
        """Listening: clear what uploads cut short by a crash left behind."""
        if self.primary:
            self.state.sweep()

    def stopFactory(self) -> None:
        self.state.stop()

    def drain(self, deadline: float) -> Deferred[None]:
        """
        As L{GuardedFactory.drain}; uploads still receiving when it fires
        (at the deadline) are aborted there and then: the connections are
        aborted, but the reactor may stop before it tells their protocols.
        """
        done = super().drain(deadline)

        def cleanup(result: object) -> object:
            count = self.state.abort_uploads()
            if count:
                log.warn(
                    "file: removed {count} unfinished upload(s) at the shutdown "
                    "deadline",
                    count=count,
                )
            return result

        done.addBoth(cleanup)
        return done

    def reconfigure(self, config: Config) -> None:
        """A reload: limits, rules and the root apply to what comes next."""
        settings = config.file
        self.set_limits(settings, settings.request_timeout, config.sockd.abort_grace)
        self.state.reconfigure(settings)

    def metrics(self) -> list[Sample]:
        """Connection counters, plus transfers, bytes sent and errors by code."""
        service = {"service": self.service_name}
        state = self.state
        if not self.primary:
            return super().metrics()
        return [
            *super().metrics(),
            *(
                (
                    "file_http_requests_total",
                    "counter",
                    {**service, "method": method, "code": str(code)},
                    count,
                )
                for (method, code), count in sorted(state.http_requests.items())
            ),
            ("file_transfers_completed_total", "counter", service, state.served),
            ("file_sent_bytes_total", "counter", service, state.bytes_sent),
            ("file_sendfile_bytes_total", "counter", service, state.sendfile_bytes),
            *(
                (
                    "file_request_errors_total",
                    "counter",
                    {**service, "code": str(code)},
                    count,
                )
                for code, count in sorted(state.refused.items())
            ),
            *(
                (
                    "file_upload_refusals_total",
                    "counter",
                    {**service, "reason": reason},
                    count,
                )
                for reason, count in sorted(state.upload_refused.items())
            ),
        ]
