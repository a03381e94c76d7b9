"""
C{sockd get|ls|stat|put}: the file client.

A plain blocking-socket program, one connection per command.  C{get}
speaks the sockd-file framed protocol (C{sockd://} or C{HOST[:PORT] PATH}),
Gopher and HTTP(S); the others only the framed protocol.  Downloads go to
C{OUT.part}, are checked where the protocol allows and only then renamed
to C{OUT}; C{--continue} resumes a C{.part}.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import os
import ssl
import stat
import sys
import time
from collections.abc import Callable

from sockd.client import framed
from sockd.client.fileproto import (
    CHUNK,
    DEFAULT_PORT,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ClientError,
    Connection,
    FileClient,
    ServerError,
    VerifyFailed,
)
from sockd.client.output import MeterFactory, Output, Progress, display, local_error
from sockd.client.tls import (
    add_client_certificate_arguments,
    add_tls_arguments,
    client_context,
)
from sockd.client.urls import Location, is_url, parse_url
from sockd.client.urls import framed as framed_location
from sockd.files.names import HIDDEN, READ_ONLY, UNAUTHORISED

__all__ = [
    "EPILOG",
    "PROTOCOLS",
    "add_arguments",
    "display",
    "human_size",
    "run",
]

PROTOCOLS = f"""\
protocols:
  sockd://HOST[:PORT]/PATH, or HOST[:PORT] PATH (port {DEFAULT_PORT})
       the sockd-file framed protocol: --continue resumes, the SHA-256 is
       always verified, -r fetches a directory tree; --tls for TLS
  gopher://HOST[:PORT]/TYPE/SELECTOR (port 70; TYPE is one character)
       no resume (Gopher has no offsets), no checksum; an empty answer or
       an error item is an error
  http://HOST[:PORT]/PATH (port 80), https://HOST[:PORT]/PATH (port 443)
       --continue resumes (Range; If-Range with the ETag or Last-Modified
       kept in OUT.part.meta, so a changed file is fetched again whole);
       verified only if the server sends Repr-Digest or Digest with a
       sha-256 value, else no checksum; at most 5 redirects, never from
       https to http; https is verified against the system CAs or --cafile
  The progress bar shows size and ETA when the protocol tells the size.
"""

EPILOG = """\
exit status:
  0    success
  1    error on this side (local file exists or cannot be written, ...)
  2    usage error
  3    connection failure: cannot connect, TLS handshake failed, timeout,
       connection cut (a partial download stays in OUT.part: resume it with
       --continue), or the server is busy or stopping (ERR or HTTP 429, 503)
  4    not found (ERR or HTTP 404; a Gopher error item saying not found)
  5    forbidden (ERR 403; HTTP 401, 403; the server refused the TLS client
       certificate, or its absence)
  6    verification failure: SHA-256 mismatch, or TLS certificate or host
       name not accepted
  7    other server error (ERR 400, 405, 409, 413, 414, 416, 500, ...; other
       HTTP statuses; other Gopher errors, or an empty Gopher answer) or an
       answer the protocol does not allow (such as a refused redirect)
  130  interrupted
"""


class UsageProblem(ClientError):
    status = EXIT_USAGE


# Shared plumbing ----------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number above 0")
    return value


def _address_argument(parser: argparse.ArgumentParser, framed_only: bool) -> None:
    schemes = "sockd://" if framed_only else "sockd://, gopher://, http(s)://"
    parser.add_argument(
        "address",
        metavar="URL|HOST[:PORT]",
        help=f"a {schemes} URL, or the sockd-file server (port {DEFAULT_PORT} "
        "if not given)",
    )


def _common_options(parser: argparse.ArgumentParser, quiet: bool = False) -> None:
    add_tls_arguments(parser, "for https://; implies --tls for the framed protocol")
    add_client_certificate_arguments(parser)
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


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """
    The TLS context that C{--tls}, C{--cafile} or C{--cert} ask for, or
    None; a usage error if a file cannot be loaded.
    """
    if not (args.tls or args.cafile or args.cert or args.key):
        return None
    try:
        return client_context(args.cafile, args.cert, args.key)
    except ValueError as e:
        raise UsageProblem(str(e)) from e


def _locate(args: argparse.Namespace, command: str, path: str | None) -> str | None:
    """
    Set C{args.location} from the address (and C{path}, its PATH argument);
    return the remote path, from the URL or C{path}.
    """
    address: str = args.address
    if not is_url(address):
        if path is None and command == "get":
            raise UsageProblem("PATH is missing: give HOST[:PORT] PATH, or a URL")
        try:
            args.location = framed_location(address, path or "")
        except ValueError as e:
            raise UsageProblem(str(e)) from e
        return path
    try:
        location = parse_url(address)
    except ValueError as e:
        raise UsageProblem(str(e)) from e
    args.location = location
    if location.scheme != "sockd":
        if command != "get":
            raise UsageProblem(
                f"sockd {command} speaks only the framed protocol: give "
                "sockd://HOST[:PORT]/PATH or HOST[:PORT]"
            )
        if path is not None:
            raise UsageProblem(f"{location.scheme}:// takes the path in the URL")
        return None
    if location.path.strip("/"):
        if path is not None:
            raise UsageProblem("give the path in the URL or after it, not both")
        return location.path
    return path


def _connect(args: argparse.Namespace, tls: ssl.SSLContext | None = None) -> Connection:
    location: Location = args.location
    if tls is None:
        tls = _tls(args)
    return Connection.open(location.host, location.port, args.timeout, tls)


def _progress(
    args: argparse.Namespace, label: str, total: int | None, initial: int
) -> Progress:
    enabled = not args.quiet and sys.stderr.isatty()
    return Progress(sys.stderr, display(label), total, initial, enabled)


def _meter(args: argparse.Namespace) -> MeterFactory:
    def meter(label: str, total: int | None, initial: int) -> Progress:
        return _progress(args, label, total, initial)

    return meter


def _basename(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]


def _warn(command: str) -> Callable[[str], None]:
    def warn(message: str) -> None:
        print(f"sockd {command}: {message}", file=sys.stderr)

    return warn


# get ----------------------------------------------------------------------


def _add_get(parser: argparse.ArgumentParser) -> None:
    _address_argument(parser, framed_only=False)
    parser.add_argument(
        "path",
        metavar="PATH",
        nargs="?",
        help="the remote file (or directory, with -r) after HOST[:PORT]",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="local file or directory (default: the remote file's name here; "
        "'-' for standard output); with -r, the directory that receives the "
        "tree (default: the remote directory's name here)",
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
    parser.add_argument(
        "-r",
        "--recursive",
        action="store_true",
        help="fetch a directory tree (framed protocol only): files identical "
        "to the remote ones (SHA-256) are skipped, others are fetched, "
        "resumed (-c) or replaced (-f)",
    )
    _common_options(parser, quiet=True)


def _target(name: str, remote: str, output: str | None) -> str:
    if output is not None and not os.path.isdir(output):
        if output.endswith("/"):
            raise UsageProblem(f"-o {output}: no such directory")
        return output
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UsageProblem(f"{display(remote)!r} names no file: give -o OUT")
    return os.path.join(output or "", name)


def _open_dir(path: str) -> int:
    try:
        return os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise local_error(path or ".", e, "cannot open directory") from e


def _get(args: argparse.Namespace) -> int:
    remote = _locate(args, "get", args.path)
    location: Location = args.location
    scheme = location.scheme
    if scheme == "sockd":
        remote = location.path if remote is None else remote
        if not remote and not args.recursive:
            raise UsageProblem("PATH is empty")
        location = Location(scheme, location.host, location.port, remote or "/")
    elif args.tls:
        raise UsageProblem(f"--tls is for the framed protocol, not {scheme}://")
    elif (args.cafile or args.cert or args.key) and scheme == "gopher":
        option = "--cafile" if args.cafile else "--cert" if args.cert else "--key"
        raise UsageProblem(f"{option}: gopher:// has no TLS")
    tls = _tls(args)
    if args.recursive:
        return _get_tree(args, location, tls)
    to_stdout = args.output == "-"
    if to_stdout and args.continue_:
        raise UsageProblem("--continue needs an output file, not '-'")
    if scheme == "gopher" and args.continue_:
        raise UsageProblem("--continue: Gopher has no offsets, so cannot resume")
    label = location.name
    out: Output | None = None
    dir_fd: int | None = None
    try:
        if not to_stdout:
            target = _target(label, location.path, args.output)
            head, name = os.path.split(target)
            dir_fd = _open_dir(head)
            out = Output(dir_fd, name, target, args.force)
            out.prepare(args.continue_)
        else:
            sys.stdout.flush()
        stdout = sys.stdout.fileno() if to_stdout else -1
        meter = _meter(args)
        try:
            if scheme == "sockd":
                with _connect(args, tls) as connection:
                    framed.fetch(
                        FileClient(connection), location.path, out, meter, label, stdout
                    )
            elif scheme == "gopher":
                from sockd.client import gopher

                gopher.fetch(location, out, meter, label, args.timeout, stdout)
            else:
                # Imported when used: http.client and email are slow to
                # import (docs/performance.md, "Client start-up").
                from sockd.client import web

                web.fetch(
                    location,
                    out,
                    meter,
                    label,
                    args.timeout,
                    tls,
                    _warn("get"),
                    stdout,
                )
        except (ClientError, KeyboardInterrupt) as e:
            if out is not None:
                out.failed(e, resumable=scheme != "gopher")
            raise
    finally:
        if out is not None:
            out.close()
        if dir_fd is not None:
            os.close(dir_fd)
    return 0


def _get_tree(
    args: argparse.Namespace, location: Location, tls: ssl.SSLContext | None
) -> int:
    if location.scheme != "sockd":
        raise UsageProblem(
            "-r needs the framed protocol: sockd://HOST[:PORT]/DIR or HOST[:PORT] DIR"
        )
    if args.output == "-":
        raise UsageProblem("-r writes a directory, not '-'")
    target = args.output or _basename(location.path)
    if target in ("", ".", "..") and args.output is None:
        raise UsageProblem(f"{display(location.path)!r} has no name: give -o DIR")
    created = False
    try:
        os.mkdir(target)
        created = True
    except FileExistsError:
        pass
    except OSError as e:
        raise local_error(target, e, "cannot create directory") from e
    root = _open_dir(target)
    try:
        with _connect(args, tls) as connection:
            tree = framed.Tree(
                FileClient(connection),
                _meter(args),
                _warn("get"),
                args.continue_,
                args.force,
            )
            tree.run(location.path, root, target)
    except (ClientError, KeyboardInterrupt):
        if created:
            # Only the directory this run made, and only if still empty.
            with contextlib.suppress(OSError):
                os.rmdir(target)
        raise
    finally:
        os.close(root)
    return 0


# ls -----------------------------------------------------------------------


def _add_ls(parser: argparse.ArgumentParser) -> None:
    _address_argument(parser, framed_only=True)
    parser.add_argument(
        "dir",
        metavar="DIR|FILE",
        nargs="?",
        help="the remote directory (default: root), or a file, shown alone",
    )
    parser.add_argument(
        "-l", "--long", action="store_true", help="show type, size and mtime (UTC)"
    )
    # As in ls(1), -h is for sizes; help is --help.
    parser.add_argument(
        "-h",
        "--human-readable",
        action="store_true",
        help="with -l, sizes as 1.5K, 23M, 4.0G (powers of 1024, rounded up)",
    )
    _common_options(parser)


def _when(mtime: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(mtime))
    except (OverflowError, OSError, ValueError):
        return str(mtime)


def human_size(size: int) -> str:
    """
    A size as C{ls -lh} shows it: bytes below 1024, then K, M, G, ...
    (powers of 1024) with one decimal below 10, always rounded up:
    C{1536} -> C{1.5K}, C{10241} -> C{11K}.
    """
    if size < 1024:
        return str(size)
    for power, unit in enumerate("KMGTPEZ", start=1):
        scale = 1024**power
        tenths = -(-size * 10 // scale)  # rounded up
        if tenths < 100:
            return f"{tenths // 10}.{tenths % 10}{unit}"
        whole = -(-size // scale)
        if whole < 1024:
            return f"{whole}{unit}"
    return f"{-(-size // 1024**8)}Y"


def _ls(args: argparse.Namespace) -> int:
    out = sys.stdout

    def show(kind: str, size: int, mtime: int, name: str) -> None:
        if not args.long:
            out.write(name + "\n")
            return
        shown = f"{human_size(size):>5}" if args.human_readable else f"{size:>14}"
        out.write(f"{kind} {shown} {_when(mtime)} {name}\n")

    with _connect(args) as connection:
        client = FileClient(connection)
        listing = client.list(args.dir)
        try:
            first = next(listing, None)
        except ServerError as e:
            # LIST of a file: like ls(1), show the file, named as given.
            if e.code != 405 or args.dir is None:
                raise
            found = client.stat(args.dir)
            if found.type != "file":
                raise
            show("f", found.size, found.mtime, display(args.dir))
            out.flush()
            return 0
        for entry in itertools.chain([first] if first else [], listing):
            name = display(entry.name) + ("/" if entry.kind == "d" else "")
            show(entry.kind, entry.size, entry.mtime, name)
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
    _address_argument(parser, framed_only=True)
    parser.add_argument(
        "path",
        metavar="PATH",
        nargs="?",
        help="the remote file or directory (or give it in the URL)",
    )
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
    _address_argument(parser, framed_only=True)
    parser.add_argument("local", metavar="LOCAL", help="the local file to upload")
    parser.add_argument(
        "remote",
        metavar="REMOTE",
        nargs="?",
        help="remote path (default: the URL's path, or LOCAL's name in the "
        "root; a trailing / means that directory)",
    )
    _common_options(parser, quiet=True)


def _put_refused(error: ServerError, remote: str) -> ServerError:
    """
    The server's refusal of a PUT, said in terms of the path where it can
    be: the directory that is missing, the hidden name.
    """
    names = [name for name in remote.split("/") if name]
    said = f"(server error {error.code}: {error.reason})"
    message = ""
    # A PUT gets 404 only for its directory: the file itself may be new.
    if error.code == 404 and len(names) > 1:
        message = f"no such directory: {display('/'.join(names[:-1]))} {said}"
    # 403 has many causes (uploads off, "..", permissions): the cause the
    # server names tells this one.
    elif error.code == 403 and error.cause == HIDDEN:
        hidden = [n for n in names if n.startswith(".") and n.strip(".")]
        if hidden:
            message = (
                f"hidden names are refused by the server: {display(hidden[0])} {said}"
            )
    elif error.code == 403 and error.cause == READ_ONLY:
        message = f"the server does not accept uploads {said}"
    elif error.code == 403 and error.cause == UNAUTHORISED:
        message = (
            "the server does not let this client upload: use --cert FILE --key "
            f"FILE with a certificate it accepts, or a network it allows {said}"
        )
    if not message:
        return error
    return ServerError(error.code, error.reason, message, error.cause)


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
        raise local_error(local, e, "cannot open") from e
    progress = Progress(sys.stderr, "", 0, enabled=False)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ClientError(f"{local}: not a regular file")
        length = info.st_size
        hasher = hashlib.sha256()
        with _connect(args) as connection:
            client = FileClient(connection)
            try:
                client.put(remote, length)
            except ServerError as e:
                raise _put_refused(e, remote) from None
            progress = _progress(args, name, length, 0)
            buffer = memoryview(bytearray(CHUNK))
            sent = 0
            while sent < length:
                try:
                    n = os.readv(fd, [buffer[: min(CHUNK, length - sent)]])
                except OSError as e:
                    raise local_error(local, e, "cannot read") from e
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
    parser.epilog = (PROTOCOLS + "\n" if name == "get" else "") + EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _framed_paths(args: argparse.Namespace, name: str) -> None:
    """C{ls}, C{stat}, C{put}: the remote path from the URL or the argument."""
    if name == "ls":
        args.dir = _locate(args, name, args.dir)
    elif name == "stat":
        args.path = _locate(args, name, args.path)
        if args.path is None:
            if not is_url(args.address):
                raise UsageProblem("PATH is missing: give HOST[:PORT] PATH, or a URL")
            args.path = "/"
    elif name == "put":
        args.remote = _locate(args, name, args.remote)


def run(args: argparse.Namespace) -> int:
    name: str = args._file_command
    try:
        if name != "get":
            _framed_paths(args, name)
        return _COMMANDS[name][1](args)
    except (ClientError, KeyboardInterrupt) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        print(f"sockd {name}: {'interrupted' if interrupted else e}", file=sys.stderr)
        for note in getattr(e, "__notes__", ()):
            print(f"sockd {name}: {note}", file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted else getattr(e, "status", 1)
