"""
The exit statuses of every C{sockd} subcommand, in one table (the README's
"Exit status" lists and each subcommand's C{--help} say the same).
"""

from __future__ import annotations

__all__ = [
    "EXIT_CONNECT",
    "EXIT_ERROR",
    "EXIT_FORBIDDEN",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_SERVER",
    "EXIT_USAGE",
    "EXIT_VERIFY",
]

#: success
EXIT_OK = 0
#: an error on this side (a file exists, cannot be written; chat: not joined)
EXIT_ERROR = 1
#: a bad command line
EXIT_USAGE = 2
#: no connection: refused, TLS handshake, timeout, cut, server busy
EXIT_CONNECT = 3
#: the server says not found
EXIT_NOT_FOUND = 4
#: the server says forbidden
EXIT_FORBIDDEN = 5
#: a checksum, certificate or host name not accepted
EXIT_VERIFY = 6
#: any other server error, or an answer the protocol does not allow
EXIT_SERVER = 7
#: interrupted (SIGINT)
EXIT_INTERRUPTED = 130
