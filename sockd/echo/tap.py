"""C{twistd sockd-echo}: line, raw and datagram echo."""

from __future__ import annotations

from twisted.application.service import IService, MultiService

from sockd.core.config import Config
from sockd.core.endpoints import parse_datagram
from sockd.core.interfaces import IDaemonReactor
from sockd.core.service import (
    DaemonOptions,
    datagram_listener,
    stream_listener,
)
from sockd.echo.protocol import DatagramEcho, EchoFactory

__all__ = ["Options", "build", "makeService"]


class Options(DaemonOptions):
    """Options for C{twistd sockd-echo}; each overrides the C{[echo]} key."""

    synopsis = "[--config FILE] [--listen ENDPOINT]... [--mode line|raw] [options]"
    longdesc = (
        "Echo service: answers each line (or, in raw mode, each chunk) "
        "upper-cased, over TCP and UDP. Settings come from the [echo] section "
        "of the INI file; these options override it."
    )
    section = "echo"


def build(config: Config, reactor: IDaemonReactor) -> list[IService]:
    """The echo listeners described by C{config.echo}."""
    settings = config.echo
    factory = EchoFactory(settings, reactor, config.sockd.abort_grace)
    services: list[IService] = [
        stream_listener("echo", description, factory, reactor, config.sockd.backlog)
        for description in settings.listen
    ]
    if settings.listen_udp:
        own = {parse_datagram(d).port for d in settings.listen_udp} - {None, 0}
        protocol = DatagramEcho(settings, reactor, own_ports=own)  # type: ignore[arg-type]
        # One byte over the limit, so a datagram too large is seen as such
        # rather than silently truncated to the limit.
        size = settings.udp_max_datagram + 1
        services += [
            datagram_listener(
                "echo", description, protocol, reactor, size, config.sockd.workers > 1
            )
            for description in settings.listen_udp
        ]
    return services


def makeService(
    options: Options, reactor: IDaemonReactor | None = None
) -> MultiService:
    return options.make_service({"echo": build}, reactor)
