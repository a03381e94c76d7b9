"""
The services sockd runs, by INI section: each one's C{build(config,
reactor)}.  This table sits above the services and is passed into the core
(L{sockd.core.service.make_daemon_service}), which never names a service;
the all-in-one daemon (L{sockd.tap}) and the workers (L{sockd.worker}) read
it.
"""

from __future__ import annotations

from sockd.chat.tap import build as build_chat
from sockd.core.interfaces import Builder
from sockd.echo.tap import build as build_echo
from sockd.files.tap import build as build_file

__all__ = ["DAEMONS"]

#: section -> its service's builder, in the order they start
DAEMONS: dict[str, Builder] = {
    "echo": build_echo,
    "chat": build_chat,
    "file": build_file,
}
