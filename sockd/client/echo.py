"""C{sockd echo HOST[:PORT] [TEXT...]}: talk to a line echo server (or over TLS)."""

from __future__ import annotations

import argparse
import functools
import socket
import ssl
import sys
from collections.abc import Callable

from sockd.client.exits import EXIT_CONNECT, EXIT_OK, EXIT_USAGE, EXIT_VERIFY
from sockd.client.tls import TLSStream, add_tls_arguments, client_context

__all__ = ["add_arguments", "run", "split_address"]

DEFAULT_PORT = 9000


def split_address(text: str, default_port: int) -> tuple[str, int]:
    """C{host}, C{host:port}, C{[v6]:port} -> (host, port); ValueError if bad."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"{text!r}: no host")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    return host, int(port)


EPILOG = """\
exit status:
  0    success
  2    usage error (including a --cafile that cannot be loaded)
  3    connection failure: cannot connect, timeout, TLS handshake failed,
       connection cut
  6    the server's TLS certificate or host name is not accepted

Over TLS the end of the input is a TLS close_notify, sent once every line
is answered: a last line without a newline gets no answer (over plain TCP,
a half-close, it does).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="HOST[:PORT]")
    parser.add_argument(
        "text", nargs="*", help="lines to send (default: read standard input)"
    )
    parser.add_argument("--timeout", type=float, default=10.0)
    add_tls_arguments(parser, "implies --tls")
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _answers(receive: Callable[[], bytes], lines: int) -> None:
    """
    Print what comes until C{lines} answer lines have (or the server
    closed).  Over TLS the end of the input goes only then: Twisted's TLS
    layer drops answers still queued when a close_notify arrives with the
    lines they answer.  Every echo mode answers a line with one line.
    """
    while lines > 0 and (chunk := receive()):
        sys.stdout.buffer.write(chunk)
        lines -= chunk.count(b"\n")


def run(args: argparse.Namespace) -> int:
    try:
        host, port = split_address(args.address, DEFAULT_PORT)
        tls = client_context(args.cafile) if args.tls or args.cafile else None
    except ValueError as e:
        print(f"sockd echo: {e}", file=sys.stderr)
        return EXIT_USAGE
    data = (
        "".join(line + "\n" for line in args.text).encode()
        if args.text
        else sys.stdin.buffer.read()
    )
    name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=args.timeout) as s:
            receive: Callable[[], bytes]
            if tls is None:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                receive = functools.partial(s.recv, 65536)
            else:
                stream = TLSStream(s, tls, host)
                stream.handshake()
                stream.sendall(data)
                _answers(stream.recv, data.count(b"\n"))
                stream.close_write()
                receive = stream.recv
            while chunk := receive():
                sys.stdout.buffer.write(chunk)
    except ssl.SSLCertVerificationError as e:
        print(
            f"sockd echo: {name}: TLS certificate not accepted: {e.verify_message}",
            file=sys.stderr,
        )
        return EXIT_VERIFY
    except ssl.SSLEOFError:
        print(f"sockd echo: {name}: TLS connection cut short", file=sys.stderr)
        return EXIT_CONNECT
    except OSError as e:
        reason = e.strerror or getattr(e, "reason", None) or e
        print(f"sockd echo: {name}: {reason}", file=sys.stderr)
        return EXIT_CONNECT
    sys.stdout.buffer.flush()
    return EXIT_OK
