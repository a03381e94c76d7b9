"""
A reactor that runs nothing, for Twisted code that wants a reactor where
nothing may run: an endpoint description parsed only to be checked (the
config check, the systemd fallback), the TLS settings an C{ssl:}
description names, and the objects Twisted's internals are checked on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator

__all__ = ["StandInReactor", "TLSListener"]


@dataclass(frozen=True)
class TLSListener:
    """What a C{listenSSL} call asked for, the factory left out."""

    port: int
    context: IOpenSSLServerConnectionCreator
    backlog: int
    interface: str


def _nothing(*args: object, **kwargs: object) -> None:
    return None


class StandInReactor:
    """
    Every call does nothing and returns None: it watches no descriptor,
    schedules nothing and binds nothing.  The TLS listeners asked of it
    are kept (L{tls_listeners}), which is how an C{ssl:} description's
    settings are read.
    """

    def __init__(self) -> None:
        self.tls_listeners: list[TLSListener] = []

    def listenSSL(
        self,
        port: int,
        factory: object,
        contextFactory: IOpenSSLServerConnectionCreator,
        backlog: int = 50,
        interface: str = "",
    ) -> None:
        self.tls_listeners.append(TLSListener(port, contextFactory, backlog, interface))

    def __getattr__(self, name: str) -> Callable[..., None]:
        return _nothing
