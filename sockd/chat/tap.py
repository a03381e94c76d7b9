"""C{twistd sockd-chat}: the UDP chat relay."""

from __future__ import annotations

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService

from sockd.chat.protocol import ChatProtocol
from sockd.chat.state import ChatState
from sockd.core.config import Config
from sockd.core.endpoints import parse_datagram
from sockd.core.interfaces import IDaemonReactor
from sockd.core.service import DaemonOptions, datagram_listener

__all__ = ["Options", "build", "makeService", "sweep_interval"]


class Options(DaemonOptions):
    """Options for C{twistd sockd-chat}; each overrides the C{[chat]} key."""

    synopsis = "[--config FILE] [--listen ENDPOINT]... [options]"
    longdesc = (
        "UDP chat relay, usable from nc -u, socat or `sockd chat`. Settings "
        "come from the [chat] section of the INI file; these options "
        "override it."
    )
    section = "chat"


def sweep_interval(idle_timeout: float) -> float:
    """How often silent members are looked for: a tenth of the timeout."""
    return max(0.5, min(idle_timeout / 10, 10.0))


def build(config: Config, reactor: IDaemonReactor) -> list[IService]:
    """The chat listeners described by C{config.chat}, sharing one state."""
    settings = config.chat
    own = frozenset(p for p in (parse_datagram(d).port for d in settings.listen) if p)
    state = ChatState(settings, reactor, own_ports=own)
    federation: list[IService] = []
    if settings.backend == "redis":
        import sockd.chat.redis as chat_redis

        federation.append(chat_redis.federate(state, settings, reactor))
    # Read more than the largest datagram accepted, so a larger one is seen
    # as such rather than silently truncated.
    size = settings.max_message + 3  # the line ending, then one byte over
    # One protocol per port (a protocol has one transport), one state.
    services: list[IService] = [
        datagram_listener("chat", description, ChatProtocol(state), reactor, size)
        for description in settings.listen
    ]
    sweeper = TimerService(sweep_interval(settings.idle_timeout), state.expire)
    sweeper.clock = reactor
    services.append(sweeper)
    # First, so Redis is checked before anything is bound.
    return federation + services


def makeService(
    options: Options, reactor: IDaemonReactor | None = None
) -> MultiService:
    return options.make_service({"chat": build}, reactor)
