"""
C{sockd get|ls|stat|put}: the sockd-file client.

A plain blocking-socket program: one framed-mode connection per command.
Downloads go to C{OUT.part}, are checked against the server's SHA-256 and
only then renamed to C{OUT}; C{--continue} resumes a C{.part}.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
import time
import unicodedata
from collections.abc import Callable
from typing import TextIO

from sockd.client.echo import split_address
from sockd.client.fileproto import (
    CHUNK,
    DEFAULT_PORT,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ClientError,
    Connection,
    FileClient,
    Pipeline,
    ServerError,
    VerifyFailed,
)
from sockd.client.tls import client_context

__all__ = [
    "EPILOG",
    "Progress",
    "add_arguments",
    "display",
    "format_duration",
    "format_size",
    "render_progress",
    "run",
]

EPILOG = """\
exit status:
  0    success
  1    error on this side (local file exists or cannot be written, ...)
  2    usage error
  3    connection failure: cannot connect, TLS handshake failed, timeout,
       connection cut (a partial download stays in OUT.part: resume it with
       --continue), or the server is busy or stopping (ERR 429, 503)
  4    not found (ERR 404)
  5    forbidden (ERR 403)
  6    verification failure: SHA-256 mismatch, or TLS certificate or host
       name not accepted
  7    other server error (ERR 400, 405, 409, 413, 414, 416, 500, ...) or
       an answer the protocol does not allow
  130  interrupted
"""


class UsageProblem(ClientError):
    status = EXIT_USAGE


# Progress display --------------------------------------------------------


def format_size(count: float) -> str:
    """C{1536} -> C{'1.5 KiB'}."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def format_duration(seconds: float) -> str:
    """C{75} -> C{'1:15'}, C{3725} -> C{'1:02:05'}."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render_progress(
    label: str,
    done: int,
    total: int,
    elapsed: float,
    initial: int = 0,
    width: int = 80,
    final: bool = False,
) -> str:
    """
    One progress line, at most C{width - 1} characters: label, bar,
    percentage, bytes so far, rate of this run (bytes after C{initial}),
    and the ETA (or, when C{final}, the time taken).
    """
    fraction = min(1.0, done / total) if total > 0 else 1.0
    rate = (done - initial) / elapsed if elapsed > 0 else 0.0
    if final:
        tail = f"in {format_duration(elapsed)}"
    elif rate > 0:
        tail = f"ETA {format_duration((total - done) / rate)}"
    else:
        tail = "ETA --:--"
    stats = (
        f" {int(fraction * 100):3d}% {format_size(done)}  {format_size(rate)}/s  {tail}"
    )
    room = width - 1 - len(stats)
    bar_width = min(30, room - min(len(label), 24) - 3)
    bar = ""
    if bar_width >= 8:
        filled = int(fraction * bar_width)
        bar = " [" + "#" * filled + "-" * (bar_width - filled) + "]"
    label_room = max(0, room - len(bar))
    if len(label) > label_room:
        label = label[: max(0, label_room - 1)] + "~" if label_room else ""
    return (label + bar + stats)[: max(0, width - 1)]


class Progress:
    """A self-overwriting progress line on a terminal, redrawn at most 4x/s."""

    def __init__(
        self,
        stream: TextIO,
        label: str,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        width: Callable[[], int] | None = None,
        interval: float = 0.25,
    ) -> None:
        self.stream = stream
        self.label = label
        self.total = total
        self.initial = initial
        self.enabled = enabled
        self.clock = clock
        self.width = width or (lambda: os.get_terminal_size(stream.fileno()).columns)
        self.interval = interval
        self.started = clock()
        self.last = float("-inf")
        self.drawn = False
        self.done = initial

    def update(self, done: int) -> None:
        self.done = done
        if self.enabled and self.clock() - self.last >= self.interval:
            self._draw(False)

    def finish(self) -> None:
        if self.enabled:
            self._draw(True)
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def abandon(self) -> None:
        """End a drawn line, so a following message starts on its own."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def _draw(self, final: bool) -> None:
        now = self.clock()
        self.last = now
        try:
            width = self.width()
        except OSError:
            width = 0
        if width <= 0:
            width = 80  # a terminal that does not know its size says 0
        line = render_progress(
            self.label,
            self.done,
            self.total,
            now - self.started,
            self.initial,
            width,
            final,
        )
        self.stream.write("\r" + line.ljust(width - 1))
        self.stream.flush()
        self.drawn = True


def display(name: bytes | str) -> str:
    """A name from the server or the user, safe to print on a terminal."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "backslashreplace")
    out = []
    for ch in name:
        # Controls, format characters (bidi, zero-width), line separators.
        if ch == "\\" or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            code = ord(ch)
            out.append(
                "\\\\"
                if ch == "\\"
                else f"\\x{code:02x}"
                if code < 0x100
                else f"\\u{code:04x}"
            )
        else:
            out.append(ch)
    return "".join(out)


# Shared plumbing ----------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number above 0")
    return value


def _address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "address",
        metavar="HOST[:PORT]",
        help=f"the sockd-file server (port {DEFAULT_PORT} if not given)",
    )


def _common_options(parser: argparse.ArgumentParser, quiet: bool = False) -> None:
    parser.add_argument(
        "--tls",
        action="store_true",
        help="use TLS; the server certificate must be valid for HOST",
    )
    parser.add_argument(
        "--cafile",
        metavar="PATH",
        help="trust the CA certificates in PATH instead of the system's "
        "(implies --tls)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=30.0,
        metavar="SECONDS",
        help="give up on a connection silent for this long (default 30)",
    )
    if quiet:
        parser.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            help="no progress bar (there is none unless stderr is a terminal)",
        )


def _connect(args: argparse.Namespace) -> Connection:
    try:
        host, port = split_address(args.address, DEFAULT_PORT)
    except ValueError as e:
        raise UsageProblem(str(e)) from e
    context = None
    if args.tls or args.cafile:
        try:
            context = client_context(args.cafile)
        except ValueError as e:
            raise UsageProblem(str(e)) from e
    return Connection.open(host, port, args.timeout, context)


def _progress(
    args: argparse.Namespace, label: str, total: int, initial: int
) -> Progress:
    enabled = not args.quiet and sys.stderr.isatty()
    return Progress(sys.stderr, display(label), total, initial, enabled)


def _basename(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]


def _local_error(path: str, error: OSError, doing: str) -> ClientError:
    return ClientError(f"{path}: {doing}: {error.strerror or error}")


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


# get ----------------------------------------------------------------------


def _add_get(parser: argparse.ArgumentParser) -> None:
    _address_argument(parser)
    parser.add_argument("path", metavar="PATH", help="the remote file")
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="local file or directory (default: the remote file's name here; "
        "'-' for standard output)",
    )
    parser.add_argument(
        "-c",
        "--continue",
        dest="continue_",
        action="store_true",
        help="resume from OUT.part, left by an interrupted download",
    )
    parser.add_argument(
        "-f", "--force", action="store_true", help="replace OUT if it exists"
    )
    _common_options(parser, quiet=True)


def _target(remote: str, output: str | None) -> str:
    if output is not None and not os.path.isdir(output):
        if output.endswith("/"):
            raise UsageProblem(f"-o {output}: no such directory")
        return output
    name = _basename(remote)
    if name in ("", ".", ".."):
        raise UsageProblem(f"{display(remote)!r} names no file: give -o OUT")
    return os.path.join(output or "", name)


def _open_partial(part: str) -> int | None:
    """The existing C{.part} to resume, opened for appending; None if none."""
    try:
        # No symlinks or FIFOs: only a regular file this command left.
        fd = os.open(part, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _local_error(part, e, "cannot resume") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ClientError(f"{part}: cannot resume: not a regular file")
    return fd


def _hash_prefix(fd: int, hasher: hashlib._Hash, path: str) -> int:
    """Hash what C{fd} holds, leaving its position at the end."""
    buffer = memoryview(bytearray(CHUNK))
    total = 0
    try:
        while n := os.readv(fd, [buffer]):
            hasher.update(buffer[:n])
            total += n
    except OSError as e:
        raise _local_error(path, e, "cannot read") from e
    return total


def _install(part: str, target: str, force: bool) -> None:
    """Give C{part} its final name; never replace a file unless C{force}."""
    if force:
        os.replace(part, target)
        return
    try:
        # link() fails if target exists, so a file created meanwhile is safe.
        os.link(part, target)
    except FileExistsError:
        raise ClientError(
            f"{target} appeared during the download; data kept in {part}"
        ) from None
    except OSError:
        # No hard links here (some filesystems): check, then rename.
        if os.path.lexists(target):
            raise ClientError(
                f"{target} appeared during the download; data kept in {part}"
            ) from None
        os.rename(part, target)
        return
    os.unlink(part)


class _Sink:
    """Consumes the body: hash, write, count, progress."""

    def __init__(
        self, fd: int, hasher: hashlib._Hash, progress: Progress, done: int, path: str
    ) -> None:
        self.fd = fd
        self.hasher = hasher
        self.progress = progress
        self.done = done
        self.path = path

    def __call__(self, view: memoryview) -> None:
        self.hasher.update(view)
        try:
            _write_all(self.fd, view)
        except OSError as e:
            raise _local_error(self.path, e, "cannot write") from e
        self.done += len(view)
        self.progress.update(self.done)


def _get(args: argparse.Namespace) -> int:
    remote: str = args.path
    if not remote:
        raise UsageProblem("PATH is empty")
    to_stdout = args.output == "-"
    if to_stdout and args.continue_:
        raise UsageProblem("--continue needs an output file, not '-'")
    target = part = ""
    fd: int | None = None
    hasher = hashlib.sha256()
    offset = 0
    if not to_stdout:
        target = _target(remote, args.output)
        part = target + ".part"
        if os.path.lexists(target) and not args.force:
            raise ClientError(f"{target} exists: use --force to replace it")
        if args.continue_:
            fd = _open_partial(part)
            if fd is not None:
                offset = _hash_prefix(fd, hasher, part)
        elif os.path.lexists(part):
            raise ClientError(f"{part} exists: resume it with --continue, or remove it")
    created = verified = False
    progress = Progress(sys.stderr, "", 0, enabled=False)
    try:
        with _connect(args) as connection:
            client = FileClient(connection)
            transfer = client.get(remote, offset)
            if to_stdout:
                sys.stdout.flush()
                out = sys.stdout.buffer.fileno()
            else:
                if fd is None:
                    try:
                        fd = os.open(
                            part,
                            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                            0o666,
                        )
                    except OSError as e:
                        raise _local_error(part, e, "cannot create") from e
                    created = True
                out = fd
            progress = _progress(args, _basename(remote), transfer.size, offset)
            sink = _Sink(out, hasher, progress, offset, part or "standard output")
            with Pipeline(sink) as pipeline:
                connection.receive(transfer.length, pipeline)
                pipeline.close()
            progress.finish()
            digest, size, mtime = client.sum(remote)
        if (size, mtime) != (transfer.size, transfer.mtime):
            raise VerifyFailed(
                "the remote file changed during the download (size or mtime "
                "differs): download it again"
            )
        if digest != hasher.hexdigest():
            raise VerifyFailed(
                f"SHA-256 mismatch: received {hasher.hexdigest()}, "
                f"the server has {digest}"
            )
        verified = True
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError as e:
                raise _local_error(part, e, "cannot sync") from e
            os.close(fd)
            fd = None
            _install(part, target, args.force)
    except (ClientError, KeyboardInterrupt) as e:
        progress.abandon()
        if fd is not None and created and os.fstat(fd).st_size == 0:
            # Only ever remove the empty file this run created.
            os.unlink(part)
        elif not verified and part and os.path.lexists(part):
            if isinstance(e, VerifyFailed):
                e.add_note(f"data kept in {part}; remove it before trying again")
            elif isinstance(e, ServerError) and e.code == 416 and offset:
                e.add_note(
                    f"{part} ({offset} bytes) is longer than the remote file; "
                    "remove it before trying again"
                )
            else:
                e.add_note(f"partial data kept in {part}: resume with --continue")
        raise
    finally:
        if fd is not None:
            os.close(fd)
    return 0


# ls -----------------------------------------------------------------------


def _add_ls(parser: argparse.ArgumentParser) -> None:
    _address_argument(parser)
    parser.add_argument(
        "dir", metavar="DIR", nargs="?", help="the remote directory (default: root)"
    )
    parser.add_argument(
        "-l", "--long", action="store_true", help="show type, size and mtime (UTC)"
    )
    _common_options(parser)


def _when(mtime: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(mtime))
    except (OverflowError, OSError, ValueError):
        return str(mtime)


def _ls(args: argparse.Namespace) -> int:
    out = sys.stdout
    with _connect(args) as connection:
        client = FileClient(connection)
        for entry in client.list(args.dir):
            name = display(entry.name) + ("/" if entry.kind == "d" else "")
            if args.long:
                out.write(
                    f"{entry.kind} {entry.size:>14} {_when(entry.mtime)} {name}\n"
                )
            else:
                out.write(name + "\n")
    out.flush()
    if client.truncated:
        print(
            f"sockd ls: the server listed only part of the directory: "
            f"{client.truncated}",
            file=sys.stderr,
        )
    return 0


# stat ---------------------------------------------------------------------


def _add_stat(parser: argparse.ArgumentParser) -> None:
    _address_argument(parser)
    parser.add_argument("path", metavar="PATH", help="the remote file or directory")
    parser.add_argument("--sum", action="store_true", help="also show a file's SHA-256")
    _common_options(parser)


def _stat(args: argparse.Namespace) -> int:
    with _connect(args) as connection:
        client = FileClient(connection)
        found = client.stat(args.path)
        digest = client.sum(args.path)[0] if args.sum and found.type == "file" else ""
    lines = [
        f"path:   {display(args.path)}",
        f"type:   {found.type}",
        f"size:   {found.size}",
        f"mtime:  {found.mtime} ({_when(found.mtime)} UTC)",
    ]
    if digest:
        lines.append(f"sha256: {digest}")
    print("\n".join(lines))
    return 0


# put ----------------------------------------------------------------------


def _add_put(parser: argparse.ArgumentParser) -> None:
    _address_argument(parser)
    parser.add_argument("local", metavar="LOCAL", help="the local file to upload")
    parser.add_argument(
        "remote",
        metavar="REMOTE",
        nargs="?",
        help="remote path (default: LOCAL's name in the root; a trailing / "
        "means that directory)",
    )
    _common_options(parser, quiet=True)


def _put(args: argparse.Namespace) -> int:
    local: str = args.local
    name = _basename(local)
    remote: str = args.remote or name
    if remote.endswith("/"):
        remote += name
    if _basename(remote) in ("", ".", ".."):
        raise UsageProblem(f"{display(remote)!r} names no file: give REMOTE")
    try:
        fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _local_error(local, e, "cannot open") from e
    progress = Progress(sys.stderr, "", 0, enabled=False)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ClientError(f"{local}: not a regular file")
        length = info.st_size
        hasher = hashlib.sha256()
        with _connect(args) as connection:
            client = FileClient(connection)
            client.put(remote, length)
            progress = _progress(args, name, length, 0)
            buffer = memoryview(bytearray(CHUNK))
            sent = 0
            while sent < length:
                try:
                    n = os.readv(fd, [buffer[: min(CHUNK, length - sent)]])
                except OSError as e:
                    raise _local_error(local, e, "cannot read") from e
                if n == 0:
                    # Closing short of the announced length: the server
                    # discards the upload.
                    raise ClientError(
                        f"{local} shrank during the upload; nothing was stored"
                    )
                hasher.update(buffer[:n])
                try:
                    connection.send(buffer[:n])
                except ClientError:
                    # A server that gave up says why in an ERR line.
                    client.stored()
                    raise
                sent += n
                progress.update(sent)
            progress.finish()
            count, digest = client.stored()
        if count != length or digest != hasher.hexdigest():
            raise VerifyFailed(
                f"the server stored {count} bytes with SHA-256 {digest}; "
                f"sent {length} bytes with SHA-256 {hasher.hexdigest()}"
            )
    except (ClientError, KeyboardInterrupt):
        progress.abandon()
        raise
    finally:
        os.close(fd)
    return 0


# Dispatch -----------------------------------------------------------------

_COMMANDS: dict[
    str,
    tuple[
        Callable[[argparse.ArgumentParser], None],
        Callable[[argparse.Namespace], int],
    ],
] = {
    "get": (_add_get, _get),
    "ls": (_add_ls, _ls),
    "stat": (_add_stat, _stat),
    "put": (_add_put, _put),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Set up C{parser} for the subcommand it was created for (its C{prog})."""
    name = parser.prog.rsplit(" ", 1)[-1]
    _COMMANDS[name][0](parser)
    parser.set_defaults(_file_command=name)
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args: argparse.Namespace) -> int:
    name: str = args._file_command
    try:
        return _COMMANDS[name][1](args)
    except (ClientError, KeyboardInterrupt) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        print(f"sockd {name}: {'interrupted' if interrupted else e}", file=sys.stderr)
        for note in getattr(e, "__notes__", ()):
            print(f"sockd {name}: {note}", file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted else getattr(e, "status", 1)
