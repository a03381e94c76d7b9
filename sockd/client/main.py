"""
C{sockd}: the client command.  Each subcommand lives in its own module,
which provides C{add_arguments(parser)} and C{run(args) -> int} (the exit
status); this module only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sockd import __version__

__all__ = ["SUBCOMMANDS", "main"]

#: name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "echo": ("sockd.client.echo", "send lines to an echo server, print answers"),
    "chat": ("sockd.client.chat", "talk in the UDP chat (interactive or piped)"),
    "cert": (
        "sockd.client.cert",
        "write a TLS certificate and key (self-signed, or from a private CA)",
    ),
    "get": ("sockd.client.files", "download a file (sockd, gopher, http, https)"),
    "ls": (
        "sockd.client.files",
        "list a directory (or show a file) on a sockd-file server",
    ),
    "stat": ("sockd.client.files", "show a remote file's type, size and mtime"),
    "put": ("sockd.client.files", "upload a file to a writable sockd-file server"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="sockd", description="Clients for the sockd daemons."
    )
    top.add_argument("--version", action="version", version=f"sockd {__version__}")
    subparsers = top.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # "resolve": a subcommand may take -h for itself (ls -h, as in
        # ls(1)); --help stays.
        sub = subparsers.add_parser(
            name, help=help_text, description=help_text, conflict_handler="resolve"
        )
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    status: int = args._module.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
