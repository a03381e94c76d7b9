"""
Downloads over the sockd-file framed protocol (docs/protocol-file.md): one
file (C{GET} from the resume offset, then C{SUM} to verify), or a whole
tree (C{sockd get -r}: C{LIST} each directory, then each file as above).

A tree is written beneath one local directory only: every name the server
lists must be a single plain name (L{sockd.files.names.parse_path}, the server's
own rules), and every local name is opened relative to its parent
directory's descriptor without following symlinks.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sockd.client.fileproto import (
    CHUNK,
    EXIT_CONNECT,
    ClientError,
    ConnectFailed,
    Entry,
    FileClient,
    ProtocolError,
    VerifyFailed,
    sink_for,
)
from sockd.client.output import (
    MeterFactory,
    Output,
    Writer,
    display,
    local_error,
)
from sockd.files.names import PathError, parse_path

__all__ = ["MAX_DEPTH", "MAX_ENTRIES", "Incomplete", "Tree", "fetch"]

#: directory levels fetched below the top one (one descriptor open per level)
MAX_DEPTH = 128
#: entries accepted in one listing (the server sends at most 10000)
MAX_ENTRIES = 100_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def fetch(
    client: FileClient,
    remote: str,
    out: Output | None,
    meter: MeterFactory,
    label: str,
    stdout: int = 1,
) -> None:
    """
    Download C{remote} into C{out} (resuming from its offset) or to the
    descriptor C{stdout}, then check size, mtime and SHA-256 with C{SUM}.
    """
    hasher = hashlib.sha256()
    offset = 0
    if out is not None:
        out.hash_prefix(hasher)
        offset = out.offset
    transfer = client.get(remote, offset)
    fd = stdout if out is None else out.open()
    progress = meter(label, transfer.size, offset)
    shown = "standard output" if out is None else out.shown_part
    writer = Writer(fd, hasher, progress, offset, shown)
    try:
        with sink_for(writer, transfer.length) as sink:
            client.connection.receive(transfer.length, sink)
            sink.close()
    except BaseException:
        progress.abandon()
        raise
    progress.finish()
    digest, size, mtime = client.sum(remote)
    if (size, mtime) != (transfer.size, transfer.mtime):
        raise VerifyFailed(
            "the remote file changed during the download (size or mtime "
            "differs): download it again"
        )
    if digest != hasher.hexdigest():
        raise VerifyFailed(
            f"SHA-256 mismatch: received {hasher.hexdigest()}, the server has {digest}"
        )
    if out is not None:
        out.commit()


class Incomplete(ClientError):
    """Some entries of a tree could not be fetched (each was reported)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Level:
    """A directory being fetched: its descriptor and subdirectories left."""

    remote: str
    fd: int
    shown: str
    depth: int
    subdirs: Iterator[str] = field(default_factory=lambda: iter(()))


class Tree:
    """
    C{sockd get -r}: a remote directory into a local one, over one
    connection.  An entry that fails (a refused name, a local file in the
    way, a server error for that file, a checksum mismatch) is reported and
    skipped; a lost connection or a protocol violation ends the run.
    """

    def __init__(
        self,
        client: FileClient,
        meter: MeterFactory,
        report: Callable[[str], None],
        resume: bool = False,
        force: bool = False,
    ) -> None:
        self.client = client
        self.meter = meter
        self.report = report
        self.resume = resume
        self.force = force
        self.fetched = self.skipped = self.entered = 0
        self.failures: list[ClientError] = []

    def run(self, remote: str, root_fd: int, shown: str) -> None:
        """Fetch C{remote} into the directory C{root_fd} (the caller's)."""
        levels = [_Level(remote, root_fd, shown, 0)]
        try:
            self._enter(levels[0])
            while levels:
                level = levels[-1]
                name = next(level.subdirs, None)
                if name is None:
                    levels.pop()
                    if level.fd != root_fd:
                        os.close(level.fd)
                    continue
                child = self._subdir(level, name)
                if child is not None:
                    self.entered += 1
                    levels.append(child)
                    self._enter(child)
        finally:
            for level in levels:
                if level.fd != root_fd:
                    os.close(level.fd)
        if self.failures:
            total = len(self.failures) + self.fetched + self.skipped + self.entered
            raise Incomplete(
                f"{len(self.failures)} of {total} entries not fetched (see above)",
                self.failures[0].status,
            )

    def _failed(self, error: ClientError) -> None:
        """Report one entry's failure, or end the run if it cannot go on."""
        if isinstance(error, ConnectFailed | ProtocolError) or (
            error.status == EXIT_CONNECT
        ):
            raise error
        self.report(str(error))
        for note in getattr(error, "__notes__", ()):
            self.report(note)
        self.failures.append(error)

    def _enter(self, level: _Level) -> None:
        """List a directory, fetch its files, queue its subdirectories."""
        try:
            entries = self._list(level)
        except ProtocolError as e:
            e.add_note(f"while listing {level.shown}")
            raise
        except ClientError as e:
            if not level.depth:
                raise  # the directory asked for: nothing to fetch at all
            self._failed(_about(level.shown, e))
            return
        subdirs = []
        for entry, name in entries:
            shown = os.path.join(level.shown, display(name))
            if entry.kind == "d":
                subdirs.append(name)
                continue
            try:
                self._file(level, entry, name, shown)
            except ClientError as e:
                self._failed(_about(shown, e))
        level.subdirs = iter(subdirs)

    def _list(self, level: _Level) -> list[tuple[Entry, str]]:
        """The listing, each name checked; refused names are reported."""
        entries: list[Entry] = []
        for entry in self.client.list(level.remote):
            if len(entries) == MAX_ENTRIES:
                raise ProtocolError(f"more than {MAX_ENTRIES} entries in a listing")
            entries.append(entry)
        listed = {entry.name for entry in entries}
        seen: set[bytes] = set()
        accepted = []
        for entry in entries:
            try:
                name = _checked_name(entry.name)
                if entry.name in seen:
                    raise ClientError("listed twice by the server: skipped")
                stem = entry.name.removesuffix(b".part")
                if entry.kind == "f" and stem != entry.name and stem in listed:
                    raise ClientError(
                        f"the download of {display(stem)} uses this name: "
                        "fetch it alone with -o"
                    )
            except ClientError as e:
                self._failed(_about(os.path.join(level.shown, display(entry.name)), e))
                continue
            finally:
                seen.add(entry.name)
            accepted.append((entry, name))
        return accepted

    def _subdir(self, level: _Level, name: str) -> _Level | None:
        shown = os.path.join(level.shown, display(name))
        try:
            if level.depth >= MAX_DEPTH:
                raise ClientError(f"deeper than {MAX_DEPTH} levels: skipped")
            try:
                os.mkdir(name, 0o777, dir_fd=level.fd)
            except FileExistsError:
                pass
            except OSError as e:
                raise local_error(shown, e, "cannot create directory") from e
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=level.fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ClientError(
                        f"{shown} exists here and is not a directory (a symlink "
                        "is never followed): skipped"
                    ) from e
                raise local_error(shown, e, "cannot open directory") from e
        except ClientError as e:
            self._failed(_about(shown, e))
            return None
        return _Level(_join(level.remote, name), fd, shown, level.depth + 1)

    def _file(self, level: _Level, entry: Entry, name: str, shown: str) -> None:
        remote = _join(level.remote, name)
        try:
            here = os.stat(name, dir_fd=level.fd, follow_symlinks=False)
        except FileNotFoundError:
            here = None
        except OSError as e:
            raise local_error(shown, e, "cannot look at") from e
        if here is not None:
            if stat.S_ISDIR(here.st_mode):
                raise ClientError(f"{shown} is a directory here: skipped")
            if (
                stat.S_ISREG(here.st_mode)
                and here.st_size == entry.size
                and self._identical(level.fd, name, shown, remote)
            ):
                self.skipped += 1
                return
            if not self.force:
                raise ClientError(
                    f"{shown} exists and differs: use --force to replace it"
                )
        out = Output(level.fd, name, shown, self.force)
        out.prepare(self.resume)
        try:
            fetch(self.client, remote, out, self.meter, shown)
        except (ClientError, KeyboardInterrupt) as e:
            out.failed(e)
            raise
        self.fetched += 1

    def _identical(self, dir_fd: int, name: str, shown: str, remote: str) -> bool:
        """Whether the local file has the remote file's size and SHA-256."""
        digest, size, _ = self.client.sum(remote)
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            raise local_error(shown, e, "cannot read") from e
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                return False
            hasher = hashlib.sha256()
            buffer = memoryview(bytearray(min(CHUNK, max(1, size))))
            while n := os.readv(fd, [buffer]):
                hasher.update(buffer[:n])
        except OSError as e:
            raise local_error(shown, e, "cannot read") from e
        finally:
            os.close(fd)
        return hasher.hexdigest() == digest


def _checked_name(raw: bytes) -> str:
    """A listed name as a local name: one plain name, by the server's rules."""
    try:
        parts = parse_path(raw, hidden=True)
    except PathError as e:
        raise ClientError(f"name refused: {e.reason}") from None
    if len(parts) != 1 or parts[0].encode("utf-8") != raw:
        raise ClientError("name refused: not a single plain name")
    return parts[0]


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if directory.strip("/") else name


def _about(shown: str, error: ClientError) -> ClientError:
    """C{error}, its message prefixed with the entry's path if not there yet."""
    text = str(error)
    if not text.startswith(shown):
        error.args = (f"{shown}: {text}",)
    return error
