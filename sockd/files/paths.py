"""
Safe path resolution for the file server: a request names a path, and only
files beneath the configured root are ever opened.

Names are checked first (L{parse_path}): NUL bytes, backslashes, invalid
UTF-8, control characters, C{.} and C{..} segments (also written with
look-alike characters such as fullwidth dots), names made only of dots,
over-long paths and components, and hidden names are refused.

Then the kernel resolves the path beneath an open descriptor of the root:
C{openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)}
(Linux 5.6+, through C{ctypes}).  A path through a symlink (or any path,
where openat2 is missing) is walked one name at a time with C{dir_fd} and
C{O_NOFOLLOW}, following relative symlinks by hand and refusing any that
climb out of the root.  Absolute symlinks are always refused.

The name rules hold for every name followed, not only the requested ones:
a symlink inside the root cannot lead to a hidden name (unless hidden names
are served) or to a reserved one (an upload in progress, L{RESERVED_PREFIX}).
The walk checks each name as it opens it, beneath the descriptor it came
from, so what is checked is what is opened.

What was opened is checked with C{fstat} on the open descriptor, never by
path, so a swap between check and open cannot escape the root; files are
opened with C{O_NONBLOCK} so a FIFO never blocks, and only after an
C{O_PATH} look has shown a regular file, so FIFOs and devices are never
opened for reading at all.  With C{hardlinks = refuse}, a regular file with
more than one link is refused too: another of its names may lie outside the
root.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from sockd.files.names import (
    HIDDEN,
    MAX_COMPONENT,
    MAX_PATH,
    RESERVED_PREFIX,
    PathError,
    parse_path,
)

__all__ = [
    "MAX_COMPONENT",
    "MAX_PATH",
    "RESERVED_PREFIX",
    "Opened",
    "PathError",
    "Root",
    "openat2_available",
    "parse_path",
]

#: symlinks followed in one resolution, as the kernel allows
MAX_SYMLINKS = 40
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "arm64": 437}

_O_PATH = getattr(os, "O_PATH", 0)
_LOOK = _O_PATH | os.O_CLOEXEC
_READ_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class Opened:
    """An open descriptor and the C{fstat} of that very descriptor."""

    fd: int
    stat: os.stat_result

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.stat.st_mode)

    def close(self) -> None:
        os.close(self.fd)


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc: ctypes.CDLL | None = None


def _openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """C{openat2(2)}; raises OSError like C{os.open}."""
    assert _libc is not None
    how = _OpenHow(flags, 0, resolve)
    encoded = os.fsencode(path)
    while True:
        fd = _libc.syscall(
            ctypes.c_long(_SYS_OPENAT2[platform.machine()]),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(encoded),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code), path)


def openat2_available() -> bool:
    """Whether this kernel (and any seccomp filter) lets us use openat2."""
    global _libc
    if platform.system() != "Linux" or platform.machine() not in _SYS_OPENAT2:
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.syscall.restype = ctypes.c_long
        fd = _openat2(-100, ".", _LOOK | os.O_DIRECTORY, _RESOLVE_BENEATH)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


_ERRORS = {
    errno.ENOENT: (404, "not found"),
    errno.ENOTDIR: (404, "not found"),
    errno.EXDEV: (403, "leads outside the root"),
    errno.ELOOP: (403, "symlink not allowed"),
    errno.EACCES: (403, "permission denied"),
    errno.EPERM: (403, "permission denied"),
    errno.ENAMETOOLONG: (414, "path too long"),
    errno.ENXIO: (405, "not a regular file"),
    errno.ENODEV: (405, "not a regular file"),
    errno.EOPNOTSUPP: (405, "not a regular file"),
}


def _refusal(error: OSError) -> PathError:
    code, reason = _ERRORS.get(error.errno or 0, (500, "cannot open"))
    return PathError(code, reason)


class Root:
    """
    The directory served.  Holds a descriptor of it for its lifetime, and
    opens paths beneath it by the C{symlinks} policy: C{inside} follows
    relative symlinks that stay beneath the root, C{refuse} follows none;
    and by the C{hardlinks} policy: C{allow} serves a regular file whatever
    its link count, C{refuse} refuses one with more than one link.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        symlinks: str = "inside",
        hidden: bool = False,
        use_openat2: bool | None = None,
        hardlinks: str = "allow",
    ) -> None:
        if symlinks not in ("inside", "refuse"):
            raise ValueError(f"symlinks must be inside or refuse, not {symlinks!r}")
        if hardlinks not in ("allow", "refuse"):
            raise ValueError(f"hardlinks must be allow or refuse, not {hardlinks!r}")
        self.path = os.fspath(path)
        self.symlinks = symlinks
        self.hidden = hidden
        self.hardlinks = hardlinks
        # Asked for or not, openat2 is only used where it works.
        self.use_openat2 = use_openat2 is not False and openat2_available()
        self.fd = os.open(self.path, _LOOK | os.O_DIRECTORY)
        # No symlink is followed by the kernel: a path through one is walked,
        # so that the names it leads to are checked (see _walk).
        self._resolve = _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_SYMLINKS

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def parse(self, raw: bytes) -> tuple[str, ...]:
        return parse_path(raw, self.hidden)

    # --- opening --------------------------------------------------------

    def open(self, parts: Sequence[str], want: str = "any") -> Opened:
        """
        Open C{parts} (from L{parse}) beneath the root: a regular file for
        reading, or a directory for listing.  C{want} is C{file}, C{dir} or
        C{any}; anything else (FIFO, socket, device) is refused with 405.
        """
        for name in parts:
            self.check_name(name)
        # A path through a symlink is walked once: both opens below start
        # from the directory that walk found.
        walked: list[tuple[int, str]] = []
        try:
            look = self._open(parts, _LOOK, walked)
            try:
                mode = os.fstat(look).st_mode
            finally:
                os.close(look)
            if stat.S_ISDIR(mode):
                if want == "file":
                    raise PathError(405, "is a directory, not a regular file")
                flags = _READ_DIR
            elif stat.S_ISREG(mode):
                if want == "dir":
                    raise PathError(405, "not a directory")
                flags = _READ_FILE
            else:
                raise PathError(405, "not a regular file")
            fd = self._open(parts, flags, walked)
        finally:
            for parent, _ in walked:
                os.close(parent)
        # Check what was really opened: the name may have been swapped since.
        info = os.fstat(fd)
        expected = stat.S_ISDIR if flags == _READ_DIR else stat.S_ISREG
        if not expected(info.st_mode):
            os.close(fd)
            raise PathError(405, "not a regular file")
        if (
            info.st_nlink > 1
            and self.hardlinks == "refuse"
            and stat.S_ISREG(info.st_mode)
        ):
            os.close(fd)
            raise PathError(403, "a file with more than one hard link is not served")
        return Opened(fd, info)

    def check_name(self, name: str) -> None:
        """
        Refuse a name that may not be followed: hidden (unless served), or
        reserved (always; reported as not found, like an absent name).
        """
        if name.startswith(RESERVED_PREFIX):
            raise PathError(404, "not found")
        if name.startswith(".") and not self.hidden:
            raise PathError(403, "hidden files are not served", HIDDEN)

    def _open(
        self, parts: Sequence[str], flags: int, walked: list[tuple[int, str]]
    ) -> int:
        """
        Open C{parts} with C{flags}: by openat2 when no symlink is on the
        way, else from the end of a walk, done once and kept in C{walked}.
        """
        path = "/".join(parts) or "."
        if self.use_openat2 and not walked:
            for _ in range(3):
                try:
                    return _openat2(self.fd, path, flags, self._resolve)
                except OSError as e:
                    if e.errno == errno.ELOOP and self.symlinks == "inside":
                        break  # a symlink on the way: walk it, checking names
                    # EAGAIN: a rename raced with "..": the kernel asks to retry.
                    if e.errno != errno.EAGAIN:
                        raise _refusal(e) from None
            else:
                raise PathError(503, "path keeps changing; try again")
        if not walked:
            walked.append(self._walk(parts))
        parent, name = walked[0]
        try:
            return os.open(name, flags | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as e:
            raise _refusal(e) from None

    def _walk(self, parts: Sequence[str]) -> tuple[int, str]:
        """
        Resolve all but the last name, one directory at a time, and return
        (descriptor of the directory holding it, the name).  The last name
        is, as far as this walk saw, not a symlink; the caller opens it
        with C{O_NOFOLLOW}, so a swap to a symlink since then is refused.
        Each name is checked (L{check_name}) before it is looked up beneath
        the directory it was found in.
        """
        stack = [os.dup(self.fd)]
        todo = list(parts)
        hops = 0
        try:
            while todo:
                name = todo.pop(0)
                if name in ("", "."):
                    continue
                if name == "..":  # only ever from a symlink's target
                    if len(stack) == 1:
                        raise PathError(403, "leads outside the root")
                    os.close(stack.pop())
                    continue
                # Every name followed, also those inside symlinks.
                self.check_name(name)
                try:
                    info = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
                except OSError as e:
                    raise _refusal(e) from None
                if stat.S_ISLNK(info.st_mode):
                    if self.symlinks == "refuse":
                        raise PathError(403, "symlink not allowed")
                    hops += 1
                    if hops > MAX_SYMLINKS:
                        raise PathError(403, "too many levels of symlinks")
                    try:
                        target = os.readlink(name, dir_fd=stack[-1])
                    except OSError as e:
                        raise _refusal(e) from None
                    if target.startswith("/"):
                        raise PathError(403, "leads outside the root")
                    todo[0:0] = target.split("/")
                    continue
                if not todo:
                    return stack.pop(), name
                if not stat.S_ISDIR(info.st_mode):
                    raise PathError(404, "not found")
                try:
                    fd = os.open(
                        name,
                        _LOOK | os.O_DIRECTORY | os.O_NOFOLLOW,
                        dir_fd=stack[-1],
                    )
                except OSError as e:
                    raise _refusal(e) from None
                stack.append(fd)
            return stack.pop(), "."
        finally:
            for fd in stack:
                os.close(fd)
