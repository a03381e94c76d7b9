"""
Reactors beside the daemon's own: L{IDatagramReactor}, what a datagram
endpoint needs of one, and L{StandInReactor}, for Twisted code that wants a
reactor where nothing may run (an endpoint description parsed only to be
checked, the TLS settings an C{ssl:} description names, the objects
Twisted's internals are checked on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IReactorSocket,
    IReactorUDP,
)

__all__ = ["IDatagramReactor", "StandInReactor", "TLSListener"]


class IDatagramReactor(IReactorUDP, IReactorSocket):
    """
    What a datagram endpoint listens with (a port, or an adopted socket):
    a type for the checker only, as L{sockd.core.interfaces.IDaemonReactor}.
    """


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
