"""
sockd-file: a file server simple enough for netcat, in the family of Gopher
(RFC 1436) and TFTP.  The wire protocol is in C{docs/protocol-file.md}.

 - Bare mode: one selector line (or bytes ended by a pause or half-close),
   the file's bytes back, then close; a directory gets a Gopher menu.
 - Framed mode, chosen by a first line starting with a keyword: C{GET},
   C{STAT}, C{SUM}, C{LIST}, C{HELP}, C{QUIT} and, when writable, C{PUT},
   several on one connection.

L{FileProtocol} parses and writes; L{FileState} holds the decisions (path
safety through L{sockd.files.paths.Root}, listings, the checksum cache, uploads,
bandwidth caps).  File bodies go out through L{sockd.files.sendfile}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockd.core.config import FileSettings, SockdSettings
from sockd.core.eager import eager_write
from sockd.core.limits import GuardedFactory, GuardedProtocol, Sample, idle_granularity
from sockd.core.logs import escape
from sockd.files.paths import RESERVED_PREFIX, Opened, PathError, Root
from sockd.files.sendfile import Bucket, Pacer, TransferError, send_file

__all__ = [
    "KEYWORDS",
    "MAX_LINE",
    "FileFactory",
    "FileProtocol",
    "FileState",
    "percent_decode",
    "percent_encode",
    "sweep_uploads",
]

T = TypeVar("T")

log = Logger(namespace="sockd.file")

KEYWORDS = frozenset({b"GET", b"STAT", b"SUM", b"LIST", b"HELP", b"QUIT", b"PUT"})
#: longest request line; room for a 4096-byte path written with %XX escapes
MAX_LINE = 16384
#: entries listed from one directory at most, and names read to find them
MAX_LISTING = 10000
MAX_SCAN = 10 * MAX_LISTING
#: pipelined requests answered for one connection in one reactor turn
REQUESTS_PER_TURN = 64
#: bytes hashed per reactor turn
HASH_STEP = 1024 * 1024
#: checksums remembered
SUM_CACHE = 4096
TEXT_SUFFIXES = frozenset(
    {".txt", ".md", ".rst", ".csv", ".json", ".ini", ".cfg", ".log", ".py", ".html"}
)
HELP = b"""\
sockd-file: commands (one line each; paths with space, % or non-printable
characters are written %XX):
  GET <path> [<offset> [<length>]]   OK <length> size=<n> mtime=<n>, then bytes
  STAT <path>                        OK type=<file|dir> size=<n> mtime=<n>
  SUM <path>                         OK sha256=<hex> size=<n> mtime=<n>
  LIST [<dir>]                       OK, lines <f|d> <size> <mtime> <name>, .
  PUT <path> <length>                OK ready, send <length> bytes, OK stored
  HELP                               this text
  QUIT                               OK bye, then close
A line not starting with a command is a bare request: the file, then close.
"""
_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%")}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_UPLOAD_PREFIX = RESERVED_PREFIX
#: the names of sockd's own temporary upload files (L{Upload}), and no other
_TEMP_NAME = re.compile(re.escape(RESERVED_PREFIX) + "[0-9a-f]{16}")


def percent_encode(name: bytes) -> bytes:
    """Space, C{%}, controls and non-ASCII bytes become C{%XX}."""
    return b"".join(bytes((b,)) if b in _SAFE else b"%%%02X" % b for b in name)


def percent_decode(text: bytes) -> bytes:
    """C{%XX} back to bytes; a C{%} not followed by two hex digits is an error."""
    if b"%" not in text:
        return text
    out = bytearray()
    i = 0
    while i < len(text):
        byte = text[i]
        if byte == 0x25:
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise PathError(400, "bad %XX escape in path")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def _number(text: bytes) -> int:
    if not text.isdigit() or len(text) > 19:
        raise PathError(400, f"expected a whole number, not {escape(text, 40)}")
    return int(text)


def _line(text: str) -> bytes:
    return text.encode("utf-8") + b"\r\n"


class Upload:
    """
    One PUT in progress: bytes go to a temporary file beside the target;
    only a complete, fsynced file is renamed (or linked) to the real name.

    The temporary file is locked (C{flock}) until it has its real name or
    is removed, which tells L{sweep_uploads} in any process that it is live.
    """

    def __init__(
        self,
        dir_fd: int,
        name: str,
        length: int,
        overwrite: bool,
        token: str,
        device: int = 0,
    ) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.length = length
        self.remaining = length
        self.overwrite = overwrite
        #: the filesystem written to, for reserving its free space
        self.device = device
        self.temp = f"{_UPLOAD_PREFIX}{token}"
        self.hash = hashlib.sha256()
        self.fd = os.open(
            self.temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o666,
            dir_fd=dir_fd,
        )
        # Where locks are unsupported the upload goes on unlocked: a sweep
        # that cannot lock a file leaves it alone.
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def feed(self, data: bytes) -> bytes:
        """Write body bytes; return what follows the body (the next request)."""
        body, rest = data[: self.remaining], data[self.remaining :]
        view = memoryview(body)
        while view:
            written = os.write(self.fd, view)  # OSError (ENOSPC, EFBIG) to caller
            view = view[written:]
        self.hash.update(body)
        self.remaining -= len(body)
        return rest

    def commit(self) -> None:
        """
        Blocking: fsync, then put the file under its real name atomically.
        If that fails, the temporary file is removed before the error is
        raised (the reactor may be stopping and never see it).
        """
        try:
            os.fsync(self.fd)
            if self.overwrite:
                os.rename(
                    self.temp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd
                )
            else:
                # link() never replaces an existing name: the no-overwrite rule
                # holds even against a file created since the PUT was accepted.
                os.link(
                    self.temp,
                    self.name,
                    src_dir_fd=self.dir_fd,
                    dst_dir_fd=self.dir_fd,
                    follow_symlinks=False,
                )
                os.unlink(self.temp, dir_fd=self.dir_fd)
            os.fsync(self.dir_fd)
        except BaseException:
            self.abort()
            raise
        # Closed (and unlocked) only now that the temporary name is gone.
        os.close(self.fd)
        self.fd = -1
        os.close(self.dir_fd)
        self.dir_fd = -1

    def abort(self) -> None:
        """Remove the temporary file; the real name is never touched."""
        if self.dir_fd >= 0:
            # Gone already, or cannot be removed (a read-only remount): the
            # descriptors are closed all the same; a later sweep removes it.
            with contextlib.suppress(OSError):
                os.unlink(self.temp, dir_fd=self.dir_fd)
        # Unlocked after the unlink: a sweep never sees it unlocked and named.
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def sweep_uploads(
    root_fd: int, before: float, stopped: Callable[[], bool] = lambda: False
) -> tuple[int, int, int]:
    """
    Blocking: remove sockd's temporary upload files anywhere beneath the
    directory C{root_fd} that no running upload holds (L{Upload} locks its
    file) and that were last written before C{before} (unix seconds).
    Symlinks are not followed.  Returns (files removed, their bytes, files
    kept because locked or recent).  Stops early once C{stopped()} is true.
    """
    removed = size = kept = 0
    for _, _, names, dir_fd in os.fwalk(".", dir_fd=root_fd):
        if stopped():
            break
        for name in names:
            if not _TEMP_NAME.fullmatch(name):
                continue
            freed = _remove_stale(dir_fd, name, before)
            if freed is None:
                kept += 1
            else:
                removed += 1
                size += freed
    return removed, size, kept


def _remove_stale(dir_fd: int, name: str, before: float) -> int | None:
    """Remove one temporary file if it is stale; its size, or None if kept."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode) or info.st_mtime >= before:
            return None
        fd = os.open(
            name,
            os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            dir_fd=dir_fd,
        )
    except OSError:
        return None
    try:
        # Locked by a running upload (of any process), or locks unsupported
        # here: not stale as far as anyone can tell.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = os.fstat(fd)
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino) or (
            held.st_mtime >= before
        ):
            return None
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return held.st_size


#: the [file] keys a L{Root} is made from: a reload changing one opens a new one
_ROOT_KEYS = ("root", "symlinks", "hidden", "hardlinks")


def open_root(settings: FileSettings) -> Root:
    """The L{Root} C{settings} describe; OSError if it cannot be opened."""
    if settings.root is None:
        raise OSError("[file] root is not set")
    return Root(
        settings.root, settings.symlinks, settings.hidden, hardlinks=settings.hardlinks
    )


class FileState:
    """
    The file service's decisions and long-lived state: what may be served,
    how listings look, remembered checksums, upload rules and the free space
    promised to uploads in progress, bandwidth.
    """

    def __init__(
        self,
        settings: FileSettings,
        clock: IReactorTime,
        root: Root | None = None,
        use_sendfile: bool = True,
        token: Callable[[], str] = lambda: os.urandom(8).hex(),
    ) -> None:
        if root is None:
            if settings.root is None:
                raise ValueError("[file] root is not set")
            root = open_root(settings)
        self.settings = settings
        self.clock = clock
        self.root = root
        self.use_sendfile = use_sendfile
        self.token = token
        self.sums: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
        self.total_bucket = (
            Bucket(settings.total_rate_limit, clock)
            if settings.total_rate_limit
            else None
        )
        self.served = 0
        self.bytes_sent = 0
        self.refused = 0
        #: uploads receiving their body: each holds back its remaining bytes
        #: of its filesystem's free space
        self.uploads: set[Upload] = set()
        self._stopped = False

    def reconfigure(self, settings: FileSettings) -> None:
        """
        A reload: new rules at once; a new root (or symlink, hidden-file or
        hard-link policy) for requests from now on.  Transfers and uploads
        under way keep the files and directories they opened.  If the new
        root cannot be opened, the old one stays.  A root newly written to
        is swept (L{sweep}).
        """
        old = self.settings
        if any(getattr(settings, k) != getattr(old, k) for k in _ROOT_KEYS):
            try:
                root = open_root(settings)
            except OSError as e:
                log.error(
                    "file: reload keeps serving {old}: cannot open {new}: {error}",
                    old=str(old.root),
                    new=str(settings.root),
                    error=str(e),
                )
                settings = dataclasses.replace(
                    settings, **{k: getattr(old, k) for k in _ROOT_KEYS}
                )
            else:
                previous, self.root = self.root, root
                previous.close()
                log.info("file: now serving {root}", root=str(settings.root))
        self.settings = settings
        if settings.writable and (settings.root != old.root or not old.writable):
            self.sweep()
        if settings.total_rate_limit != old.total_rate_limit:
            self.total_bucket = (
                Bucket(settings.total_rate_limit, self.clock)
                if settings.total_rate_limit
                else None
            )

    # --- reading --------------------------------------------------------

    def open(self, raw: bytes, want: str = "any") -> tuple[tuple[str, ...], Opened]:
        parts = self.root.parse(raw)
        return parts, self.root.open(parts, want)

    def pacer(self) -> Pacer | None:
        rate = self.settings.rate_limit
        own = Bucket(rate, self.clock) if rate else None
        if own is None and self.total_bucket is None:
            return None
        return Pacer(own, self.total_bucket)

    def listing(
        self, parts: tuple[str, ...], opened: Opened
    ) -> list[tuple[str, str, os.stat_result]]:
        """(kind f or d, name, stat) for each servable entry, sorted by name."""
        try:
            # Bounded: a directory of millions of names costs no more than
            # reading MAX_SCAN of them.
            with os.scandir(opened.fd) as entries_:
                names = sorted(itertools.islice((e.name for e in entries_), MAX_SCAN))
        finally:
            opened.close()
        entries: list[tuple[str, str, os.stat_result]] = []
        for name in names:
            if len(entries) >= MAX_LISTING:
                break
            # Only names a client could request: UTF-8, no control
            # characters, not hidden unless allowed.
            try:
                if self.root.parse(os.fsencode(name)) != (name,):
                    continue
            except PathError:
                continue
            if name.startswith(_UPLOAD_PREFIX):
                continue
            try:
                child = self.root.open((*parts, name), "any")
            except PathError:
                continue  # FIFOs, sockets, symlinks out of the root...
            child.close()
            entries.append(("d" if child.is_dir else "f", name, child.stat))
        return entries

    def checksum(self, opened: Opened) -> Deferred[str]:
        """SHA-256 of an open file, remembered by inode, size and mtime."""
        info = opened.stat
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        known = self.sums.get(key)
        if known is not None:
            opened.close()
            self.sums.move_to_end(key)
            return succeed(known)
        result = _Hasher(opened, self.clock).start()
        result.addCallback(self._remember, key)
        return result

    def _remember(self, hexdigest: str, key: tuple[int, int, int, int]) -> str:
        self.sums[key] = hexdigest
        if len(self.sums) > SUM_CACHE:
            self.sums.popitem(last=False)
        return hexdigest

    # --- writing --------------------------------------------------------

    def begin_upload(self, raw: bytes, length: int) -> Upload:
        """
        Accept a PUT of C{length} bytes to C{raw}, or raise L{PathError}:
        the upload's temporary file is created and its length held back
        from the free space (L{release} gives it back).
        """
        settings = self.settings
        if not settings.writable:
            raise PathError(403, "this server does not accept uploads")
        if length > settings.max_upload:
            raise PathError(413, f"upload larger than {settings.max_upload} bytes")
        parts = self.root.parse(raw)
        if not parts:
            raise PathError(400, "PUT needs a file name")
        name = parts[-1]
        if name.startswith(_UPLOAD_PREFIX):
            raise PathError(403, "reserved name")
        directory = self.root.open(parts[:-1], "dir")
        dir_fd = directory.fd
        try:
            try:
                existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISREG(existing.st_mode):
                    raise PathError(405, "target exists and is not a regular file")
                if not settings.overwrite:
                    raise PathError(409, "file exists and overwrite is off")
            device = directory.stat.st_dev
            space = os.fstatvfs(dir_fd)
            # Free space is promised once: what uploads in progress on this
            # filesystem have yet to write is not free for this one.
            promised = sum(u.remaining for u in self.uploads if u.device == device)
            available = max(0, space.f_bavail * space.f_frsize - promised)
            if length > available:
                raise PathError(
                    413, f"not enough free space ({available} bytes available)"
                )
            upload = Upload(
                dir_fd, name, length, settings.overwrite, self.token(), device
            )
        except PathError:
            os.close(dir_fd)
            raise
        except OSError as e:
            os.close(dir_fd)
            raise PathError(_write_code(e), f"cannot create: {e.strerror}") from None
        self.uploads.add(upload)
        return upload

    def release(self, upload: Upload) -> None:
        """An upload has its whole body, or is aborted: its space is free."""
        self.uploads.discard(upload)

    def abort_uploads(self) -> int:
        """
        Abort every upload still receiving (the daemon is stopping and will
        not see their connections close); return how many.
        """
        uploads, self.uploads = self.uploads, set()
        for upload in uploads:
            upload.abort()
        return len(uploads)

    def sweep(self) -> Deferred[None]:
        """
        Remove, in a thread, the temporary files of uploads cut short by a
        crash anywhere beneath the root (only when uploads are accepted).

        Another process sharing the root (C{[sockd] workers}, a second
        daemon) may have uploads running: a file is stale only if no upload
        holds its lock and it was last written longer ago than the idle
        timeout (and its granularity), after which an upload that received
        nothing has been closed.
        """
        settings = self.settings
        if self._stopped or not settings.writable:
            return succeed(None)
        window = settings.idle_timeout + idle_granularity(settings.idle_timeout)
        before = self.clock.seconds() - window
        where = str(settings.root)
        try:
            # Its own descriptor: a reload may close the root's meanwhile.
            fd = os.dup(self.root.fd)
        except OSError as e:
            log.error("file: cannot sweep {root}: {error}", root=where, error=str(e))
            return succeed(None)

        def work() -> tuple[int, int, int]:
            try:
                return sweep_uploads(fd, before, lambda: self._stopped)
            finally:
                os.close(fd)

        def done(result: tuple[int, int, int]) -> None:
            removed, size, kept = result
            log.info(
                "file: swept {root}: removed {removed} stale upload file(s), "
                "{size} bytes; kept {kept} (locked, recent or not a plain file)",
                root=where,
                removed=removed,
                size=size,
                kept=kept,
            )

        def failed(failure: Failure) -> None:
            log.failure("file: sweeping {root} failed", failure, root=where)

        return self.blocking(work).addCallbacks(done, failed)

    def stop(self) -> None:
        """The service is stopping: a sweep under way ends early."""
        self._stopped = True

    def blocking(self, work: Callable[[], T]) -> Deferred[T]:
        """Run blocking work (fsync) in a thread when the reactor has them."""
        if IReactorThreads.providedBy(self.clock):
            reactor: Any = self.clock
            result: Deferred[T] = deferToThreadPool(
                reactor, reactor.getThreadPool(), work
            )
            return result
        return maybeDeferred(work)


class _Hasher:
    """Hashes an open file L{HASH_STEP} bytes per reactor turn."""

    def __init__(self, opened: Opened, clock: IReactorTime) -> None:
        self.opened = opened
        self.clock = clock
        self.offset = 0
        self.digest = hashlib.sha256()
        self.call: IDelayedCall | None = None
        self.result: Deferred[str] = Deferred(self._cancel)

    def start(self) -> Deferred[str]:
        self.call = self.clock.callLater(0, self._step)
        return self.result

    def _step(self) -> None:
        self.call = None
        opened = self.opened
        try:
            data = os.pread(opened.fd, HASH_STEP, self.offset)
            if data:
                self.digest.update(data)
                self.offset += len(data)
                self.call = self.clock.callLater(0, self._step)
                return
            now = os.fstat(opened.fd)
        except OSError as e:
            opened.close()
            self.result.errback(PathError(500, f"read error: {e.strerror}"))
            return
        opened.close()
        before = opened.stat
        if (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            self.result.errback(PathError(503, "file changed while hashing; try again"))
            return
        self.result.callback(self.digest.hexdigest())

    def _cancel(self, result: Deferred[str]) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
            self.call = None
            self.opened.close()


def _write_code(error: OSError) -> int:
    if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return 413
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return 403
    if error.errno == errno.EEXIST:
        return 409
    return 500


class FileProtocol(GuardedProtocol):
    """One connection: a bare request, or framed requests one after another."""

    # Bodies go out in sendfile() calls of 256 KiB: with TCP_NODELAY each
    # call's tail leaves as a segment of its own (1 GiB: 0.77x nginx with
    # it, 0.92x without, in one alternating run).
    nodelay = False

    factory: FileFactory
    mode = ""  # "", then "bare" or "framed" from the first request
    _buffer = b""
    _busy = False
    _ended = False
    _draining = False
    _processing = False
    _yield: IDelayedCall | None = None
    _lost = False
    _pause: IDelayedCall | None = None
    _upload: Upload | None = None
    _sender: Any = None
    _work: Deferred[Any] | None = None

    # --- input ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.touch()
        self.bytes_in += len(data)
        if self._upload is not None:
            data = self._uploadData(data)
            if not data or self.closing:
                return
        self._buffer = self._buffer + data if self._buffer else data
        if self._busy:
            if len(self._buffer) > MAX_LINE:
                self.transport.pauseProducing()  # type: ignore[union-attr]
            return
        self._process()

    def _process(self) -> None:
        # An answer that completes at once (a cached SUM, an empty file)
        # comes back here through _next: let the outer loop carry on rather
        # than recurse once per pipelined request.
        if self._processing:
            return
        self._processing = True
        try:
            self._processLines()
        finally:
            self._processing = False

    def _processLines(self) -> None:
        answered = 0
        while not (self._busy or self.closing or self._upload is not None):
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            if answered >= REQUESTS_PER_TURN:
                # Many pipelined requests answered at once: give the other
                # connections their turn, and continue on the next one.
                self._setBusy(True)
                self._yield = self.factory.clock.callLater(0, self._continue)
                return
            answered += 1
            if end > MAX_LINE:
                self._tooLong()
                return
            line = self._buffer[:end]
            self._buffer = self._buffer[end + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._cancelPause()
            self.stopDeadline()
            self._request(line)
        if self._busy or self.closing or self._upload is not None:
            return
        if len(self._buffer) > MAX_LINE:
            self._tooLong()
        elif self._ended:
            self._atEnd()
        elif self._buffer:
            # An absolute deadline for the line: trickling bytes does not
            # extend it.  A first line may also end with a pause (a client
            # that sends a name and no newline, as the classic tutorial's).
            self.startDeadline()
            word, space, _ = self._buffer.partition(b" ")
            if not self.mode and not (space and word in KEYWORDS):
                self._startPause()
            elif not self.mode:
                # A pause started by bytes before the space no longer applies.
                self._cancelPause()

    def _continue(self) -> None:
        self._yield = None
        self._next()

    def _tooLong(self) -> None:
        self._buffer = b""
        self._error(414, f"request line longer than {MAX_LINE} bytes", b"", close=True)

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
        if self._buffer and not self.mode and not self._busy and not self.closing:
            line, self._buffer = self._buffer, b""
            self.stopDeadline()
            self._request(line.rstrip(b"\r"))
            self._process()

    def inputEnded(self) -> None:
        self._ended = True
        if self._upload is not None:
            self._abortUpload()
            self._error(
                400, "connection ended in the middle of an upload", b"PUT", close=True
            )
        elif not self._busy:
            self._process()

    def _atEnd(self) -> None:
        """The peer sent all it will: answer an unterminated last request."""
        self._cancelPause()
        if self._buffer:
            line, self._buffer = self._buffer, b""
            self._request(line.rstrip(b"\r"))
        if not (self._busy or self.closing or self._upload is not None):
            self.close()

    # --- requests -------------------------------------------------------

    def _request(self, line: bytes) -> None:
        if not self.mode:
            self.mode = "framed" if line.split(b" ", 1)[0] in KEYWORDS else "bare"
        if self.mode == "bare":
            self._bare(line)
            return
        word, _, rest = line.partition(b" ")
        handler = self._commands.get(word)
        if handler is None:
            self._error(400, "unknown command; send HELP for the list", word)
            return
        args = rest.split(b" ") if rest else []
        path = args[0] if args else b""
        try:
            if b"" in args:
                raise PathError(400, "arguments are separated by single spaces")
            handler(self, args)
        except PathError as e:
            self._error(e.code, e.reason, word, path, close=word == b"PUT")
        except OSError as e:
            # Descriptor exhaustion (EMFILE), I/O errors: this request fails,
            # the daemon goes on.
            self._error(500, f"internal error: {e.strerror}", word, path, close=True)

    def _bare(self, line: bytes) -> None:
        # Gopher clients may add a tab and more after the selector.
        selector = line.split(b"\t", 1)[0]
        state = self.factory.state
        try:
            parts, opened = state.open(selector)
            if opened.is_dir:
                self.close(self._menu(parts, opened))
                return
        except PathError as e:
            self._error(e.code, e.reason, b"", selector, close=True)
            return
        except OSError as e:
            self._error(500, f"internal error: {e.strerror}", b"", selector)
            return
        self._log("bare", selector)
        self._send(opened, 0, opened.stat.st_size, self.close)

    def _menu(self, parts: tuple[str, ...], opened: Opened) -> bytes:
        """A Gopher menu (RFC 1436 type 1) of a directory."""
        host = self.transport.getHost()  # type: ignore[union-attr]
        where = f"\t{getattr(host, 'host', 'localhost')}\t{getattr(host, 'port', 0)}"
        lines = []
        for kind, name, _info in self.factory.state.listing(parts, opened):
            if kind == "d":
                kind = "1"
            else:
                kind = (
                    "0" if os.path.splitext(name)[1].lower() in TEXT_SUFFIXES else "9"
                )
            selector = "/" + "/".join((*parts, name))
            lines.append(f"{kind}{name}\t{selector}{where}\r\n")
        lines.append(".\r\n")
        return "".join(lines).encode("utf-8")

    def _get(self, args: list[bytes]) -> None:
        if not 1 <= len(args) <= 3:
            raise PathError(400, "usage: GET <path> [<offset> [<length>]]")
        offset = _number(args[1]) if len(args) > 1 else 0
        length = _number(args[2]) if len(args) > 2 else None
        _, opened = self.factory.state.open(percent_decode(args[0]), "file")
        size = opened.stat.st_size
        if offset > size:
            opened.close()
            raise PathError(416, f"offset {offset} is beyond the end ({size} bytes)")
        count = size - offset if length is None else min(size - offset, length)
        mtime = int(opened.stat.st_mtime)
        self._write(_line(f"OK {count} size={size} mtime={mtime}"))
        self._log("GET", args[0])
        self._send(opened, offset, count, self._next)

    def _stat(self, args: list[bytes]) -> None:
        if len(args) != 1:
            raise PathError(400, "usage: STAT <path>")
        _, opened = self.factory.state.open(percent_decode(args[0]))
        opened.close()
        info = opened.stat
        kind = "dir" if opened.is_dir else "file"
        self._write(
            _line(f"OK type={kind} size={info.st_size} mtime={int(info.st_mtime)}")
        )

    def _sum(self, args: list[bytes]) -> None:
        if len(args) != 1:
            raise PathError(400, "usage: SUM <path>")
        _, opened = self.factory.state.open(percent_decode(args[0]), "file")
        info = opened.stat
        self._setBusy(True)
        work = self._work = self.factory.state.checksum(opened)

        def done(hexdigest: str) -> None:
            self._write(
                _line(
                    f"OK sha256={hexdigest} size={info.st_size} "
                    f"mtime={int(info.st_mtime)}"
                )
            )

        def failed(failure: Failure) -> None:
            if self._lost:
                return  # cancelled: nobody to answer
            error = failure.value
            if not isinstance(error, PathError):
                log.failure("file: SUM failed", failure)
                error = PathError(500, "internal error")
            self._error(error.code, error.reason, b"SUM", args[0])

        work.addCallbacks(done, failed)
        work.addBoth(self._workDone)

    def _list(self, args: list[bytes]) -> None:
        if len(args) > 1:
            raise PathError(400, "usage: LIST [<dir>]")
        path = percent_decode(args[0]) if args else b""
        parts, opened = self.factory.state.open(path, "dir")
        out = [b"OK\r\n"]
        for kind, name, info in self.factory.state.listing(parts, opened):
            encoded = percent_encode(name.encode("utf-8"))
            out.append(
                b"%s %d %d %s\r\n"
                % (kind.encode(), info.st_size, int(info.st_mtime), encoded)
            )
        out.append(b".\r\n")
        self._write(b"".join(out))

    def _help(self, args: list[bytes]) -> None:
        body = b"".join(line + b"\r\n" for line in HELP.splitlines())
        self._write(b"OK\r\n" + body + b".\r\n")

    def _quit(self, args: list[bytes]) -> None:
        self.close(b"OK bye\r\n")

    def _put(self, args: list[bytes]) -> None:
        if len(args) != 2:
            raise PathError(400, "usage: PUT <path> <length>")
        length = _number(args[1])
        upload = self.factory.state.begin_upload(percent_decode(args[0]), length)
        self._upload = upload
        self._log("PUT", args[0])
        self._write(b"OK ready\r\n")
        data, self._buffer = self._buffer, b""
        if length == 0 or data:
            self._buffer = self._uploadData(data)

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

    def _uploadData(self, data: bytes) -> bytes:
        upload = self._upload
        assert upload is not None
        try:
            rest = upload.feed(data)
        except OSError as e:
            self._abortUpload()
            self._error(
                _write_code(e), f"cannot write: {e.strerror}", b"PUT", close=True
            )
            return b""
        if upload.remaining == 0:
            self._upload = None
            self.factory.state.release(upload)
            self._commit(upload)
        return rest

    def _commit(self, upload: Upload) -> None:
        self._setBusy(True)
        # Not kept in _work: a commit running in a thread is never cancelled
        # (the file is complete; it goes under its name even if the client
        # has gone).
        work = self.factory.state.blocking(upload.commit)

        def done(_: None) -> None:
            self._write(
                _line(f"OK stored {upload.length} sha256={upload.hash.hexdigest()}")
            )

        def failed(failure: Failure) -> None:
            upload.abort()
            error = failure.value
            if isinstance(error, OSError):
                code = _write_code(error)
                reason = (
                    "file exists" if code == 409 else f"cannot store: {error.strerror}"
                )
            else:
                log.failure("file: storing an upload failed", failure)
                code, reason = 500, "internal error"
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
        self, opened: Opened, offset: int, count: int, then: Callable[[], None]
    ) -> None:
        state = self.factory.state
        transport = self.transport
        self._setBusy(True)
        # The transport is registered as its own producer (backpressure on
        # reading); the file sender takes that place during the transfer.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()  # type: ignore[union-attr]
        sender, result = send_file(
            transport,
            opened.fd,
            offset,
            count,
            state.clock,
            state.pacer(),
            self._progress,
            state.use_sendfile,
        )
        self._sender = sender

        def sent(count: int) -> None:
            self._sender = None
            state.served += 1
            if not self._lost:
                self._setBusy(False)
                then()

        def failed(failure: Failure) -> None:
            self._sender = None
            error = failure.value
            if not isinstance(error, TransferError):
                log.failure("file: transfer failed", failure)
            elif not self._lost:
                log.info(
                    "file: {peer}: transfer ended early: {error}",
                    peer=self._key,
                    error=str(error),
                )
            self.close()

        result.addCallbacks(sent, failed)

    def _progress(self, count: int) -> None:
        self.factory.state.bytes_sent += count
        self.bytes_out += count
        self.touch()  # a transfer that moves is not idle

    def _setBusy(self, busy: bool) -> None:
        self._busy = busy
        transport: Any = self.transport
        if self.closing or self._lost or transport is None:
            return
        if busy:
            transport.pauseProducing()
        else:
            if getattr(transport, "producer", None) is None:
                transport.registerProducer(transport, True)
            transport.resumeProducing()

    def _workDone(self, result: object) -> None:
        self._work = None
        if not self._lost and not self.closing:
            self._next()

    def _next(self) -> None:
        if self._draining:
            # Stopping: the work in flight is done; take no more requests.
            self.close(b"ERR 503 shutting down\r\n")
            return
        self._setBusy(False)
        self._process()

    def close(self, message: bytes = b"") -> None:
        """
        Close as L{GuardedProtocol.close} does; an upload in progress is
        aborted at once, since no more of its body will be read.
        """
        self._abortUpload()
        super().close(message)

    def shutdown(self) -> None:
        """The daemon is stopping: finish a transfer or upload in flight."""
        if self.closing or self.transport is None:
            return
        self._draining = True
        self._cancelPause()
        if self._busy or self._upload is not None:
            return  # _next (or the upload's end) closes afterwards
        if self.mode == "framed":
            self._write(b"ERR 503 shutting down\r\n")
        super().shutdown()

    # --- answers --------------------------------------------------------

    def _error(
        self,
        code: int,
        reason: str,
        command: bytes,
        path: bytes = b"",
        close: bool = False,
    ) -> None:
        self.factory.state.refused += 1
        log.info(
            "file: {peer} {command} {path}: {code} {reason}",
            peer=self._key,
            command=escape(command or b"bare", 20),
            path=escape(path),
            code=code,
            reason=reason,
        )
        line = b""
        if self.mode != "bare" or self.factory.state.settings.bare_errors == "line":
            line = _line(f"ERR {code} {reason}")
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
        self._lost = True
        self._cancelPause()
        if self._yield is not None and self._yield.active():
            self._yield.cancel()
        if self._sender is not None and not self._sender.done:
            self._sender.stopProducing()
        self._sender = None
        if self._work is not None:
            self._work.cancel()
        self._abortUpload()
        super().connectionLost(reason)


class FileFactory(GuardedFactory):
    """The file service under the limits of C{[file]}."""

    service_name = "file"
    protocol = FileProtocol  # type: ignore[assignment]

    def __init__(
        self, state: FileState, clock: IReactorTime, abort_grace: float = 5.0
    ) -> None:
        settings = state.settings
        super().__init__(
            clock,
            settings,
            request_timeout=settings.request_timeout,
            abort_grace=abort_grace,
        )
        self.state = state

    def refusal(self, reason: str) -> bytes:
        return f"ERR 429 {reason}\r\n".encode()

    def startFactory(self) -> None:
        """Listening: clear what uploads cut short by a crash left behind."""
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

    def reconfigure(self, settings: FileSettings, shared: SockdSettings) -> None:
        """A reload: limits, rules and the root apply to what comes next."""
        self.set_limits(settings, settings.request_timeout, shared.abort_grace)
        self.state.reconfigure(settings)

    def metrics(self) -> list[Sample]:
        """Connection counters, plus files served and bytes sent."""
        service = {"service": self.service_name}
        state = self.state
        return [
            *super().metrics(),
            ("files_served_total", "counter", service, state.served),
            ("file_bytes_sent_total", "counter", service, state.bytes_sent),
            ("file_requests_refused_total", "counter", service, state.refused),
        ]
