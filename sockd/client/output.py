"""
The local side of a download, whatever the protocol: C{OUT.part} is
written beside C{OUT}, then given the name C{OUT}.  Both names are looked
up relative to a directory held open, never through a symlink, so a name
from a server can only ever land in that directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Callable
from typing import Protocol, TextIO

from tqdm import tqdm

from sockd.client.fileproto import CHUNK, ClientError, ServerError, VerifyFailed
from sockd.core.text import LISTING, sanitise

__all__ = [
    "Meter",
    "MeterFactory",
    "Output",
    "Progress",
    "Writer",
    "display",
    "install",
    "local_error",
    "write_all",
]


class Meter(Protocol):
    """A progress display (L{Progress})."""

    def update(self, done: int) -> None: ...

    def finish(self) -> None: ...

    def abandon(self) -> None: ...


#: (label, total size or None if unknown, bytes already there) -> a Meter
MeterFactory = Callable[[str, "int | None", int], Meter]


def _width(stream: TextIO) -> int:
    # The last column left free (a line that fills it wraps on some
    # terminals); one that does not know its size (says 0) gets 80.
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        columns = 0
    return columns - 1 if columns > 1 else 79


class Progress:
    """
    A L{Meter} drawn by tqdm on C{stream} when C{enabled}: size, rate (a
    moving average, so a first burst fades), ETA when the C{total} is
    known.  A download resumed at C{initial} bytes counts only the bytes
    of this run in its rate.
    """

    def __init__(
        self,
        stream: TextIO,
        label: str,
        total: int | None,
        initial: int = 0,
        enabled: bool = True,
    ) -> None:
        self.bar = tqdm(
            desc=label,
            total=total,
            initial=initial,
            file=stream,
            disable=not enabled,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            # Given, not asked of the terminal: one that says 0x0 would
            # get nothing drawn.  The height only matters to nested bars.
            ncols=_width(stream) if enabled else None,
            nrows=24,
            leave=True,
            # Every update may redraw (at most every 0.1 s) and so feed the
            # moving average: with tqdm's adaptive count, a first burst would
            # hold the redraws (and the rate) back for a long while.
            miniters=1,
        )
        #: no byte of this run shown yet
        self.waiting = True

    def update(self, done: int) -> None:
        """C{done} bytes are there in all (not: this many more)."""
        bar = self.bar
        bar.update(done - bar.n)
        if self.waiting and not bar.disable:
            # tqdm redraws at most every 0.1 s: a first burst followed by
            # a stall would show 0% until its monitor wakes (10 s).
            self.waiting = False
            bar.refresh()

    def finish(self) -> None:
        self.bar.close()

    def abandon(self) -> None:
        """End a drawn bar, so a following message starts on its own line."""
        self.bar.close()


def display(name: bytes | str) -> str:
    """A name from the server or the user, safe to print on a terminal."""
    return sanitise(name, LISTING)


def local_error(path: str, error: OSError, doing: str) -> ClientError:
    return ClientError(f"{path}: {doing}: {error.strerror or error}")


def write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def install(dir_fd: int, part: str, name: str, force: bool, shown: str) -> None:
    """Give C{part} the name C{name}; never replace a file unless C{force}."""
    if force:
        # Replaces a symlink itself, never what it points to.
        os.replace(part, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    appeared = ClientError(
        f"{shown} appeared during the download; data kept in {shown}.part"
    )
    try:
        # link() fails if the name exists, so a file created meanwhile is safe.
        os.link(part, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise appeared from None
    except OSError:
        # No hard links here (some filesystems): check, then rename.
        if _exists(dir_fd, name):
            raise appeared from None
        os.rename(part, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    os.unlink(part, dir_fd=dir_fd)


class Writer:
    """Consumes a body: hash (when checked), write, count, show progress."""

    def __init__(
        self,
        fd: int,
        hasher: hashlib._Hash | None,
        meter: Meter,
        done: int,
        path: str,
    ) -> None:
        self.fd = fd
        self.hasher = hasher
        self.meter = meter
        self.done = done
        self.path = path

    def __call__(self, view: memoryview) -> None:
        if self.hasher is not None:
            self.hasher.update(view)
        try:
            write_all(self.fd, view)
        except OSError as e:
            raise local_error(self.path, e, "cannot write") from e
        self.done += len(view)
        self.meter.update(self.done)


class Output:
    """
    C{name} in the directory C{dir_fd} (which stays the caller's), by way
    of C{name.part}.  C{shown} is the path as the user sees it.
    """

    def __init__(self, dir_fd: int, name: str, shown: str, force: bool) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.part = name + ".part"
        self.shown = shown
        self.shown_part = shown + ".part"
        self.force = force
        self.fd: int | None = None
        #: bytes already in the .part when the download (re)started
        self.offset = 0
        self.created = False
        #: names beside the C{.part} that go when it goes (HTTP validator)
        self.extras: list[str] = []
        #: the data was checked and is being (or was) given its final name
        self.verified = False

    def prepare(self, resume: bool) -> None:
        """
        Refuse an existing C{OUT} (unless C{force}) or C{OUT.part} (unless
        C{resume}); open the C{OUT.part} to resume.
        """
        if not self.force and _exists(self.dir_fd, self.name):
            raise ClientError(f"{self.shown} exists: use --force to replace it")
        if resume:
            self.fd = self._open_partial()
            if self.fd is not None:
                self.offset = os.lseek(self.fd, 0, os.SEEK_END)
        elif _exists(self.dir_fd, self.part):
            raise ClientError(
                f"{self.shown_part} exists: resume it with --continue, or remove it"
            )

    def _open_partial(self) -> int | None:
        try:
            # No symlinks or FIFOs: only a regular file this command left.
            fd = os.open(
                self.part,
                os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=self.dir_fd,
            )
        except FileNotFoundError:
            return None
        except OSError as e:
            raise local_error(self.shown_part, e, "cannot resume") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ClientError(f"{self.shown_part}: cannot resume: not a regular file")
        return fd

    def hash_prefix(self, hasher: hashlib._Hash) -> None:
        """Hash the C{offset} bytes the C{.part} held when resumed."""
        if self.fd is None or not self.offset:
            return
        buffer = memoryview(bytearray(min(CHUNK, self.offset)))
        position = 0
        try:
            while position < self.offset:
                n = os.preadv(self.fd, [buffer[: self.offset - position]], position)
                if n == 0:
                    raise OSError(errno.EIO, "the file shrank while being read")
                hasher.update(buffer[:n])
                position += n
        except OSError as e:
            raise local_error(self.shown_part, e, "cannot read") from e

    def open(self) -> int:
        """The C{.part} to write to, created (never replaced) if need be."""
        if self.fd is None:
            try:
                self.fd = os.open(
                    self.part,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o666,
                    dir_fd=self.dir_fd,
                )
            except OSError as e:
                raise local_error(self.shown_part, e, "cannot create") from e
            self.created = True
        return self.fd

    def restart(self) -> None:
        """Empty the C{.part}: the download starts again from byte 0."""
        fd = self.open()
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError as e:
            raise local_error(self.shown_part, e, "cannot truncate") from e
        self.offset = 0

    def commit(self) -> None:
        """Flush the C{.part} to disk and give it its final name."""
        self.verified = True
        fd = self.open()
        try:
            os.fsync(fd)
        except OSError as e:
            raise local_error(self.shown_part, e, "cannot sync") from e
        self.close()
        try:
            install(self.dir_fd, self.part, self.name, self.force, self.shown)
        except ClientError:
            raise
        except OSError as e:
            raise local_error(self.shown, e, "cannot rename the .part file") from e
        self._remove_extras()

    def _remove_extras(self) -> None:
        for name in self.extras:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.dir_fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def failed(self, error: BaseException, resumable: bool = True) -> None:
        """
        After a failed download: remove the C{.part} if this run created it
        and it is empty (or cannot be resumed), else say what is in it.
        """
        if self.verified:
            self.close()
            return
        try:
            if self.fd is not None and self.created:
                empty = os.fstat(self.fd).st_size == 0
                if empty or not resumable:
                    # Only ever the file this run created.
                    os.unlink(self.part, dir_fd=self.dir_fd)
                    self._remove_extras()
                    return
            if not _exists(self.dir_fd, self.part):
                return
        finally:
            self.close()
        if isinstance(error, VerifyFailed):
            error.add_note(
                f"data kept in {self.shown_part}; remove it before trying again"
            )
        elif isinstance(error, ServerError) and error.code == 416 and self.offset:
            error.add_note(
                f"{self.shown_part} ({self.offset} bytes) is longer than the "
                "remote file; remove it before trying again"
            )
        elif resumable:
            error.add_note(
                f"partial data kept in {self.shown_part}: resume with --continue"
            )
