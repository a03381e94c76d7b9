"""C{sockd echo HOST[:PORT] [TEXT...]}: talk to a line echo server."""

from __future__ import annotations

import argparse
import socket
import sys

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="HOST[:PORT]")
    parser.add_argument(
        "text", nargs="*", help="lines to send (default: read standard input)"
    )
    parser.add_argument("--timeout", type=float, default=10.0)


def run(args: argparse.Namespace) -> int:
    try:
        host, port = split_address(args.address, DEFAULT_PORT)
    except ValueError as e:
        print(f"sockd echo: {e}", file=sys.stderr)
        return 2
    data = (
        "".join(line + "\n" for line in args.text).encode()
        if args.text
        else sys.stdin.buffer.read()
    )
    try:
        with socket.create_connection((host, port), timeout=args.timeout) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                sys.stdout.buffer.write(chunk)
    except OSError as e:
        print(f"sockd echo: {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 3
    sys.stdout.buffer.flush()
    return 0
