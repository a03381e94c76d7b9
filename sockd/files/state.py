"""
The file service's decisions and long-lived state, without the wire: what
may be served (through L{sockd.files.paths.Root}), directory listings a
slice at a time (L{DirectoryScan}), remembered checksums, uploads
(L{Upload}) and the sweep of those a crash cut short, bandwidth caps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import heapq
import itertools
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockd.core.config import FileSettings
from sockd.core.interfaces import Reason
from sockd.core.limits import AccessList, TokenBucket, idle_granularity
from sockd.core.logs import escape
from sockd.files import gopher
from sockd.files.names import READ_ONLY, UNAUTHORISED
from sockd.files.paths import RESERVED_PREFIX, Opened, PathError, Root
from sockd.files.sendfile import Pacer

if TYPE_CHECKING:
    from sockd.core.tls import ClientCertificate

__all__ = [
    "MAX_LISTING",
    "DirectoryScan",
    "Entry",
    "FileState",
    "MenuScan",
    "Peer",
    "Upload",
    "open_root",
    "store_failure",
    "sweep_uploads",
    "upload_refusal",
    "write_code",
]

T = TypeVar("T")

log = Logger(namespace="sockd.file")

#: entries listed from one directory at most (the default of [file]
#: max_list_entries), and names read to find them
MAX_LISTING = 10000
MAX_SCAN = 10 * MAX_LISTING
#: a listing's work per reactor turn: names read (and sorted), then names
#: checked (each an open and a stat); a few milliseconds each
#: (docs/performance.md, "Listing work per reactor turn")
SCAN_NAMES = 2048
SCAN_ENTRIES = 128
#: bytes hashed per reactor turn
HASH_STEP = 1024 * 1024
#: checksums remembered
SUM_CACHE = 4096
_UPLOAD_PREFIX = RESERVED_PREFIX
#: the names of sockd's own temporary upload files (L{Upload}), and no other
_TEMP_NAME = re.compile(re.escape(RESERVED_PREFIX) + "[0-9a-f]{16}")


def _byte_bucket(rate: int, clock: IReactorTime) -> TokenBucket | None:
    """A cap of C{rate} bytes a second saving one second's worth; 0: none."""
    return TokenBucket(rate, rate, clock) if rate else None


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

    def feed(self, data: bytes) -> None:
        """Write body bytes (the codec frames the body: never more than remain)."""
        if len(data) > self.remaining:
            raise ValueError(f"{len(data)} bytes for {self.remaining} remaining")
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)  # OSError (ENOSPC, EFBIG) to caller
            view = view[written:]
        self.hash.update(data)
        self.remaining -= len(data)

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


@dataclasses.dataclass(frozen=True)
class Peer:
    """
    Who sends a request: the client's address (a PROXY header's, behind a
    proxy) and its TLS client certificate, if it sent one.
    """

    host: str
    certificate: ClientCertificate | None = None

    @classmethod
    def of(cls, host: str, transport: object) -> Peer:
        """The client at C{host} on C{transport}, with its certificate over TLS."""
        from twisted.internet.interfaces import ISSLTransport

        if not ISSLTransport.providedBy(transport):
            return cls(host)
        # Imported here: pyOpenSSL is loaded already when a transport is TLS.
        from sockd.core.tls import client_certificate

        return cls(host, client_certificate(transport))


def upload_refusal(
    settings: FileSettings, peer: Peer, allowed: AccessList | None = None
) -> tuple[Reason, str] | None:
    """
    Why C{peer} may not upload (a reason code, and the client's message),
    or None if it may.  With C{upload_clients}, a PUT needs a client
    certificate that verified against C{client_ca} and names one of them
    (subject CN or subjectAltName DNS name, ignoring case); with
    C{upload_allow}, the address must be in one of its networks; with both,
    both must hold.  C{allowed}: C{upload_allow} as an L{AccessList}.
    """
    if settings.upload_clients:
        certificate = peer.certificate
        if certificate is None:
            return (
                "certificate",
                "uploads need a client certificate (sockd put --cert FILE --key FILE)",
            )
        if certificate.problem:
            return (
                "certificate",
                f"client certificate not accepted: {certificate.problem}",
            )
        if not set(certificate.names) & set(settings.upload_clients):
            named = escape(certificate.names[0], 64) if certificate.names else ""
            return (
                "certificate",
                f"client certificate {named or '(no name)'} may not upload",
            )
    if settings.upload_allow:
        if allowed is None:
            allowed = AccessList(settings.upload_allow)
        if not allowed.permits(peer.host):
            return ("acl", f"uploads are not allowed from {escape(peer.host, 64)}")
    return None


#: the [file] keys a L{Root} is made from: a reload changing one opens a new one
_ROOT_KEYS = ("root", "symlinks", "hidden", "hardlinks")


def open_root(settings: FileSettings) -> Root:
    """The L{Root} C{settings} describe; OSError if it cannot be opened."""
    if settings.root is None:
        raise OSError("[file] root is not set")
    return Root(
        settings.root, settings.symlinks, settings.hidden, hardlinks=settings.hardlinks
    )


#: one entry of a listing: kind (f or d), name, stat
Entry = tuple[str, str, os.stat_result]


class DirectoryScan:
    """
    A directory listing worked out a slice at a time, so that a big
    directory never holds the reactor: L{step} reads L{SCAN_NAMES} names
    (up to L{MAX_SCAN} in all, each batch sorted), then, once all are read,
    takes them in name order and checks L{SCAN_ENTRIES} of them, keeping
    those a client could request, at most C{limit}.  L{truncated} says why
    a finished listing stopped short ("" if it did not).
    """

    def __init__(
        self,
        root: Root,
        parts: tuple[str, ...],
        opened: Opened,
        limit: int,
        classify: Callable[[str, Opened], str] | None = None,
    ) -> None:
        self.root = root
        self.parts = parts
        self.limit = limit
        #: gives an entry's kind (f or d without it) while it is open
        self.classify = classify
        #: names left out (shown already, or the gophermap)
        self.skip: set[str] = set()
        self.found = 0
        self.truncated = ""
        self.done = False
        self._read = 0
        self._runs: list[list[str]] = []
        #: every name in order, once all have been read
        self.names: Iterator[str] | None = None
        try:
            # scandir() reads a duplicate of the descriptor.
            self._dir: os._ScandirIterator[str] | None = os.scandir(opened.fd)
        finally:
            opened.close()

    @property
    def started(self) -> bool:
        """Every name is read: an error now cannot be answered as one."""
        return self.names is not None or self.done

    def step(self) -> list[Entry]:
        """
        One slice of work; the entries found in it, in name order.  An
        error reading the directory (C{OSError}) ends the scan.
        """
        if self.done:
            return []
        try:
            if self.names is None:
                self._readNames()
            if self.names is None:
                return []
            return self._check(self.names)
        except BaseException:
            self.close()
            raise

    def _readNames(self) -> None:
        directory = self._dir
        assert directory is not None
        want = min(SCAN_NAMES, MAX_SCAN - self._read)
        batch = [entry.name for entry in itertools.islice(directory, want)]
        self._read += len(batch)
        if batch:
            self._runs.append(sorted(batch))
        if len(batch) == want and self._read < MAX_SCAN:
            return  # more to read on the next step
        if self._read >= MAX_SCAN and next(directory, None) is not None:
            self.truncated = f"more than {MAX_SCAN} names in the directory"
        self._closeDir()
        self.names = heapq.merge(*self._runs)
        self._runs = []

    def _check(self, names: Iterator[str]) -> list[Entry]:
        found: list[Entry] = []
        if self.root.fd < 0:
            # A reload closed the root these names are opened under.
            self.truncated = "the server was reconfigured during the listing"
            self.close()
            return found
        for checked, name in enumerate(names, 1):
            entry = self._entry(name)
            if entry is not None:
                if self.found >= self.limit:
                    self.truncated = f"more than {self.limit} entries"
                    break
                self.found += 1
                found.append(entry)
            if checked >= SCAN_ENTRIES:
                return found
        self.close()
        return found

    def _entry(self, name: str) -> Entry | None:
        # Only names a client could request: UTF-8, no control characters,
        # not hidden unless allowed.
        try:
            if self.root.parse(os.fsencode(name)) != (name,):
                return None
        except PathError:
            return None
        if name.startswith(_UPLOAD_PREFIX) or name in self.skip:
            return None
        try:
            child = self.root.open((*self.parts, name), "any")
        except PathError:
            return None  # FIFOs, sockets, symlinks out of the root...
        try:
            kind = "d" if child.is_dir else "f"
            if self.classify is not None:
                kind = self.classify(name, child)
        finally:
            child.close()
        return (kind, name, child.stat)

    def _closeDir(self) -> None:
        directory, self._dir = self._dir, None
        if directory is not None:
            directory.close()

    def close(self) -> None:
        """Finished, or abandoned: release the directory."""
        self.done = True
        self._closeDir()
        self._runs = []
        self.names = None


def _head(opened: Opened) -> bytes:
    """A file's first bytes, read on its open descriptor (binary if unreadable)."""
    try:
        return os.pread(opened.fd, gopher.SNIFF, 0)
    except OSError:
        return b"\0"


def _classify(name: str, opened: Opened) -> str:
    """The Gopher item type of an open entry (see L{gopher.item_type})."""
    return gopher.item_type(name, opened.is_dir, lambda: _head(opened))


class MenuScan:
    """
    A Gopher menu of a directory, a slice at a time: the lines of its
    gophermap, if it has one (each local selector opened through the jail
    as a request for it would be; one that could not be requested is
    dropped), then, where the map asks for them (or there is no map), the
    directory's entries as L{DirectoryScan} finds them, less those the map
    listed and (with C{[file] gophermap}) the map itself.
    """

    def __init__(
        self,
        root: Root,
        parts: tuple[str, ...],
        listing: DirectoryScan,
        gophermap: gopher.GopherMap | None = None,
        hide_map: bool = False,
    ) -> None:
        self.root = root
        self.parts = parts
        self.listing = listing
        listing.classify = _classify
        if hide_map:
            listing.skip.add(gopher.MAP_NAME)
        self._lines = gophermap.lines if gophermap is not None else ()
        self._rest = gophermap is None or gophermap.rest
        self._next = 0
        self._map_done = gophermap is None
        #: why map lines were left out, logged once the map is done
        self.dropped = list(gophermap.dropped) if gophermap is not None else []
        self._emitted = False
        self.done = False
        self.truncated = ""

    @property
    def started(self) -> bool:
        """Lines were given: an error now cannot be answered as one."""
        return self._emitted or self.listing.started

    def step(self) -> list[gopher.Item]:
        """One slice of work: the menu's next items (map lines, then entries)."""
        if self.done:
            return []
        try:
            if not self._map_done:
                items = self._mapped()
            else:
                items = [
                    gopher.Item(kind, name, "/" + "/".join((*self.parts, name)))
                    for kind, name, _ in self.listing.step()
                ]
                if self.listing.done:
                    self.truncated = self.listing.truncated
                    self.close()
        except BaseException:
            self.close()
            raise
        self._emitted = self._emitted or bool(items)
        return items

    def _mapped(self) -> list[gopher.Item]:
        end = min(self._next + SCAN_ENTRIES, len(self._lines))
        lines, self._next = self._lines[self._next : end], end
        items = [item for line in lines if (item := self._resolve(line)) is not None]
        if self._next == len(self._lines):
            self._map_done = True
            if self.dropped:
                log.warn(
                    "file: gophermap of /{where}: {count} line(s) left out: {reasons}",
                    where=escape("/".join(self.parts)),
                    count=len(self.dropped),
                    reasons="; ".join(self.dropped[:3]),
                )
            if not self._rest:
                self.close()
        return items

    def _resolve(self, line: gopher.Item) -> gopher.Item | None:
        """A map's line as served: local selectors checked and made absolute."""
        if line.type == gopher.INFO or line.host:
            return line
        selector = line.selector
        try:
            parts = self.root.parse(selector.encode("utf-8"))
            if not selector.startswith("/"):
                parts = (*self.parts, *parts)
            opened = self.root.open(parts, "any")
        except (PathError, OSError) as e:
            reason = e.reason if isinstance(e, PathError) else str(e.strerror)
            self.dropped.append(f"{escape(selector, 80)}: {reason}")
            return None
        try:
            kind = line.type
            if opened.is_dir:
                kind = gopher.DIRECTORY
            elif kind == gopher.DIRECTORY:
                kind = _classify(parts[-1], opened)
        finally:
            opened.close()
        if parts and parts[:-1] == self.parts:
            self.listing.skip.add(parts[-1])  # listed: not again with the rest
        return gopher.Item(kind, line.display, "/" + "/".join(parts))

    def close(self) -> None:
        """Finished, or abandoned: release the directory."""
        self.done = True
        self.listing.close()


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
        self.total_bucket = _byte_bucket(settings.total_rate_limit, clock)
        self.served = 0
        self.bytes_sent = 0
        #: HTTP requests answered, by method and status (sockd.files.http);
        #: one series from the start, so the family shows before any traffic
        self.http_requests: dict[tuple[str, int], int] = {("GET", 200): 0}
        #: of those, sent with sendfile: the rest were copied (TLS, ...)
        self.sendfile_bytes = 0
        #: requests answered ERR, by code; docs/protocol-file.md's codes are
        #: there from the start, so each series shows (at 0) before it is used
        self.refused: dict[int, int] = dict.fromkeys(
            (400, 403, 404, 405, 409, 413, 414, 416, 500, 503), 0
        )
        #: uploads receiving their body: each holds back its remaining bytes
        #: of its filesystem's free space
        self.uploads: set[Upload] = set()
        #: C{upload_allow}, and the uploads refused by reason code
        self.upload_access = AccessList(settings.upload_allow)
        self.upload_refused: dict[Reason, int] = {"acl": 0, "certificate": 0}
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
        if settings.upload_allow != old.upload_allow:
            self.upload_access = AccessList(settings.upload_allow)
        if settings.writable and (settings.root != old.root or not old.writable):
            self.sweep()
        if settings.total_rate_limit != old.total_rate_limit:
            self.total_bucket = _byte_bucket(settings.total_rate_limit, self.clock)

    # --- reading --------------------------------------------------------

    def open(self, raw: bytes, want: str = "any") -> tuple[tuple[str, ...], Opened]:
        parts = self.root.parse(raw)
        return parts, self.root.open(parts, want)

    def pacer(self) -> Pacer | None:
        own = _byte_bucket(self.settings.rate_limit, self.clock)
        if own is None and self.total_bucket is None:
            return None
        return Pacer(own, self.total_bucket)

    def scan(self, parts: tuple[str, ...], opened: Opened) -> DirectoryScan:
        """Begin listing the directory C{opened} (the path C{parts})."""
        return DirectoryScan(self.root, parts, opened, self.settings.max_list_entries)

    def menu(self, parts: tuple[str, ...], opened: Opened) -> MenuScan:
        """Begin a Gopher menu of the directory C{opened} (the path C{parts})."""
        listing = self.scan(parts, opened)
        shaped = self.settings.gophermap
        found = self._gophermap(parts) if shaped else None
        return MenuScan(self.root, parts, listing, found, hide_map=shaped)

    def _gophermap(self, parts: tuple[str, ...]) -> gopher.GopherMap | None:
        """The directory's gophermap, parsed; None if it has none (or a bad one)."""
        where = escape("/" + "/".join((*parts, gopher.MAP_NAME)))
        try:
            opened = self.root.open((*parts, gopher.MAP_NAME), "file")
        except PathError as e:
            if e.code != 404:
                log.warn("file: {map} ignored: {reason}", map=where, reason=e.reason)
            return None
        except OSError as e:
            log.warn("file: {map} ignored: {reason}", map=where, reason=e.strerror)
            return None
        try:
            data = b""
            if opened.stat.st_size <= gopher.MAX_MAP:
                data = os.pread(opened.fd, gopher.MAX_MAP + 1, 0)
        except OSError as e:
            log.warn("file: {map} ignored: {reason}", map=where, reason=e.strerror)
            return None
        finally:
            opened.close()
        if opened.stat.st_size > gopher.MAX_MAP or len(data) > gopher.MAX_MAP:
            log.warn(
                "file: {map} ignored: larger than {limit} bytes",
                map=where,
                limit=gopher.MAX_MAP,
            )
            return None
        return gopher.parse_map(data)

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

    def known_sum(self, info: os.stat_result) -> str | None:
        """The SHA-256 of a file with this C{stat}, if remembered; never computed."""
        return self.sums.get((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))

    def _remember(self, hexdigest: str, key: tuple[int, int, int, int]) -> str:
        self.sums[key] = hexdigest
        if len(self.sums) > SUM_CACHE:
            self.sums.popitem(last=False)
        return hexdigest

    # --- writing --------------------------------------------------------

    def authorise_upload(self, peer: Peer) -> None:
        """
        Raise L{PathError} 403 unless uploads are on and C{peer} may upload
        (L{upload_refusal}); a refusal is counted by reason and logged.
        """
        settings = self.settings
        if not settings.writable:
            raise PathError(403, "this server does not accept uploads", READ_ONLY)
        refusal = upload_refusal(settings, peer, self.upload_access)
        if refusal is None:
            return
        reason, message = refusal
        self.upload_refused[reason] = self.upload_refused.get(reason, 0) + 1
        log.info(
            "file: refused an upload from {peer} ({reason}): {message}",
            peer=escape(peer.host, 64),
            reason=reason,
            message=message,
        )
        raise PathError(403, message, UNAUTHORISED)

    def begin_upload(self, raw: bytes, length: int, peer: Peer) -> Upload:
        """
        Accept a PUT of C{length} bytes to C{raw} from C{peer}, or raise
        L{PathError}: who may upload is checked first (L{authorise_upload}),
        then the upload's temporary file is created and its length held
        back from the free space (L{release} gives it back).
        """
        self.authorise_upload(peer)
        settings = self.settings
        if length > settings.max_upload:
            raise PathError(413, f"upload larger than {settings.max_upload} bytes")
        parts = self.root.parse(raw)
        if not parts:
            raise PathError(400, "PUT needs a file name")
        name = parts[-1]
        if name.startswith(_UPLOAD_PREFIX):
            raise PathError(403, "reserved name")
        if settings.gophermap and name == gopher.MAP_NAME:
            # A map shapes menus: only those who run the server write one.
            raise PathError(403, "gophermaps are not accepted as uploads")
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
            raise PathError(write_code(e), f"cannot create: {e.strerror}") from None
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
            reactor = IReactorThreads(self.clock)
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


def store_failure(failure: Failure) -> tuple[int, str]:
    """
    The code and reason for an upload whose storing failed: a write error
    the client can act on, else 500 (and the traceback is logged).
    """
    error = failure.value
    if isinstance(error, OSError):
        code = write_code(error)
        return code, "file exists" if code == 409 else f"cannot store: {error.strerror}"
    log.failure("file: storing an upload failed", failure)
    return 500, "internal error"


def write_code(error: OSError) -> int:
    if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return 413
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return 403
    if error.errno == errno.EEXIST:
        return 409
    return 500
