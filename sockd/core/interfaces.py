"""
What a service shows the core, declared rather than found: a service object
that can be reloaded, drained or scraped says so with C{@implementer}, and
the core asks with C{providedBy} or adaptation, never by probing attributes.

A service gives the core a L{Builder} per INI section; the table of them
lives above the services (C{sockd.daemons}) and is passed in, so the core
never names a service.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorProcess,
    IReactorTCP,
    IReactorTime,
)
from zope.interface import Interface

from sockd.core.config import Config
from sockd.core.reactors import IDatagramReactor

__all__ = [
    "REASONS",
    "Builder",
    "IAccessControlled",
    "IDaemonReactor",
    "IDrainable",
    "IMetricsSource",
    "IReconfigurable",
    "PeerAddress",
    "Reason",
    "Sample",
]

#: a datagram's peer, (host, port), as Twisted's UDP port gives it (an
#: IPv6 address's flow and scope dropped) and C{sendto} takes it
PeerAddress = tuple[str, int]

#: one metric sample: (name, "counter" or "gauge", labels, value)
Sample = tuple[str, str, dict[str, str], float]

#: why a connection, join or datagram was refused or dropped: the values
#: of the C{reason} label, one vocabulary for every service
Reason = Literal[
    "total",
    "per_ip",
    "share",
    "rate_limited",
    "loop",
    "loop_budget",
    "oversized",
    "invalid",
    "amplification",
    "send_error",
    "acl",
    "proxy",
    "certificate",
]

#: each L{Reason}, and what it means wherever it appears
REASONS: dict[Reason, str] = {
    "total": "a server-wide cap was reached (connections, members, output)",
    "per_ip": "the address's own cap was reached",
    "share": "the address held its fair share while the server was busy",
    "rate_limited": "faster than the address's (or member's) rate allows",
    "loop": "from a port that could make a loop, or our own words coming back",
    "loop_budget": "the address and port used up their answers without a pause",
    "oversized": "larger than the size allowed",
    "invalid": "malformed (a chat datagram that is not UTF-8)",
    "amplification": "the answer would exceed what the sender's bytes buy",
    "send_error": "the kernel refused to send the answer",
    "acl": "the address is not admitted by the allow/deny lists",
    "proxy": "a PROXY header missing from a trusted proxy, invalid, or sent by "
    "an address that is not a trusted proxy",
    "certificate": "no TLS client certificate, one that did not verify against "
    "the CA, or one whose names are not listed",
}


class IReconfigurable(Interface):
    """Takes a new configuration on reload (SIGHUP)."""

    def reconfigure(config: Config) -> None:
        """Apply C{config} now; each object reads its own section of it."""


class IAccessControlled(Interface):
    """Serves only the clients an access list admits."""

    def set_access(access: Any, trusted_proxies: Any) -> None:
        """
        Admit only what C{access} (an L{sockd.core.limits.AccessList})
        permits; believe PROXY headers from C{trusted_proxies} (another).
        """


class IDrainable(Interface):
    """Lets work in flight finish before the process stops."""

    def drain(deadline: float) -> Deferred[None]:
        """Finish what is under way; fire when done, cutting off at C{deadline}s."""


class IMetricsSource(Interface):
    """Counts what it serves, for the metrics page and workers' reports."""

    def metrics() -> list[Sample]:
        """The counters and gauges as they are now."""


class IDaemonReactor(
    IReactorCore,
    IReactorTime,
    IReactorTCP,
    IDatagramReactor,
    IReactorProcess,
    IReactorFromThreads,
):
    """
    The reactor interfaces a daemon uses, together: a type for the checker
    only.  Twisted's reactors provide each of them but declare no such
    union, so never test it with C{providedBy}; the reactor gets this type
    where twistd (or a worker's entry point) hands it over.
    """


class Builder(Protocol):
    """A service's C{build}: the listeners (and helpers) of its section."""

    def __call__(self, config: Config, reactor: IDaemonReactor) -> list[IService]: ...
