"""
Wiring shared by every daemon: command-line options over the INI file,
listeners for stream and datagram endpoints, and the service tree.

Each service's C{tap} module provides C{build(config, reactor)} (a
L{Builder}), returning its listeners; a daemon passes the builders of the
sections it runs to L{make_daemon_service}, which never names a service.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, cast

from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import (
    IFileDescriptor,
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

import sockd.core.config as _config
import sockd.core.workers as workers
from sockd.core.config import Config, ConfigError
from sockd.core.endpoints import bind_reusing_port, parse_datagram, stream_endpoint
from sockd.core.epoll import lean_dispatch
from sockd.core.interfaces import (
    Builder,
    IAccessControlled,
    IDaemonReactor,
    IDrainable,
    IReconfigurable,
)
from sockd.core.limits import AccessList, GuardedFactory
from sockd.core.logs import prefer_journal
from sockd.core.notify import Notifier
from sockd.core.proxy import ProxyHeaderFactory

__all__ = [
    "DaemonOptions",
    "DescriptorLimit",
    "Lifecycle",
    "Listener",
    "Ready",
    "datagram_listener",
    "descriptor_budget",
    "global_reactor",
    "make_daemon_service",
    "shared_sockets",
    "stream_listener",
    "with_backlog",
]

log = Logger(namespace="sockd")

#: what a signal handler may be (as signal.signal takes and returns it)
_Handler = Callable[[int, FrameType | None], Any] | int | None


def global_reactor() -> IDaemonReactor:
    """
    The reactor twistd installed: where the running reactor gets its type.
    Imported here, when asked for, since importing it installs the default
    reactor if twistd has not chosen one yet.
    """
    from twisted.internet import reactor

    return cast(IDaemonReactor, reactor)


class Listener(Service):
    """
    Listens on one endpoint while running.  Binding happens in
    C{privilegedStartService}, before twistd drops privileges, and a failure
    to bind stops start-up with a message naming the endpoint.
    """

    port: IListeningPort | None = None

    def __init__(
        self,
        service: str,
        description: str,
        listen: Callable[[], IListeningPort | Deferred[IListeningPort]],
        target: object = None,
        adopt: Callable[[int, socket.AddressFamily], IListeningPort] | None = None,
        rebind: Callable[[str, int], IListeningPort] | None = None,
    ) -> None:
        self.service = service
        self.description = description
        self._listen = listen
        self._inherited = False
        #: the factory or datagram protocol serving this endpoint
        self.target = target
        self._adopt = adopt
        self._rebind = rebind
        self.setName(f"{service} {description}")

    def rebind(self, host: str, port: int) -> None:
        """
        Bind a socket of our own beside the main process's, sharing its
        address (C{SO_REUSEPORT}, see L{datagram_listener}).
        """
        bind = self._rebind
        if bind is None:
            raise ValueError(f"{self.service} {self.description} cannot be shared")
        self._listen = lambda: bind(host, port)
        self._inherited = True

    def shared_address(self) -> tuple[str, int] | None:
        """Where workers bind beside us, or None if they inherit the socket."""
        if self._rebind is None or self.port is None:
            return None
        address = self.port.getHost()
        assert isinstance(address, IPv4Address | IPv6Address)  # it binds one
        return address.host, address.port

    def inherit(self, fd: int) -> None:
        """
        Serve the socket at descriptor C{fd}, bound by another process (see
        L{sockd.core.workers}), instead of binding.
        """
        adopt = self._adopt
        if adopt is None:
            raise ValueError(f"{self.service} {self.description} cannot be shared")

        def listen() -> IListeningPort:
            with socket.socket(fileno=os.dup(fd)) as probe:
                family = probe.family
            port = adopt(fd, family)
            # Twisted serves a duplicate: the inherited descriptor can go.
            os.close(fd)
            return port

        self._listen = listen
        self._inherited = True

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        super().startService()
        self._bind()

    def _bind(self) -> None:
        if self.port is not None:
            return
        try:
            result = self._listen()
        except Exception as e:
            raise SystemExit(self._failed(e)) from None
        if isinstance(result, Deferred):
            outcome: list[IListeningPort | Failure] = []
            result.addBoth(outcome.append)
            if not outcome:
                raise SystemExit(
                    f"{self.service}: {self.description}: did not "
                    "bind at once; asynchronous endpoints are not "
                    "supported"
                )
            if isinstance(outcome[0], Failure):
                raise SystemExit(self._failed(outcome[0].value or Exception()))
            result = outcome[0]
        self.port = result
        kind, where = self.where()
        # A worker serving an inherited socket says so once, when ready.
        log.emit(
            LogLevel.debug if self._inherited else LogLevel.info,
            "{service}: listening on {kind} {where}",
            service=self.service,
            kind=kind,
            where=where,
            description=self.description,
        )

    def where(self) -> tuple[str, str]:
        """(C{TCP}/C{UDP}/C{UNIX}, address) of the bound port."""
        assert self.port is not None
        address = self.port.getHost()
        if isinstance(address, IPv4Address | IPv6Address):
            return address.type, f"{address.host}:{address.port}"
        return getattr(address, "type", "UNIX"), str(getattr(address, "name", address))

    def _failed(self, error: BaseException) -> str:
        return f"sockd: {self.service} cannot listen on {self.description}: {error}"

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        result = port.stopListening()
        return result if isinstance(result, Deferred) else None


def with_backlog(description: str, backlog: int) -> str:
    """Add C{backlog=} to a listening description that has none."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl", "unix") and not re.search(
        r"(^|:)backlog=", description
    ):
        return f"{description}:backlog={backlog}"
    return description


def stream_listener(
    service: str,
    description: str,
    factory: Factory,
    reactor: IDaemonReactor,
    backlog: int,
    client_certs: str = "none",
    client_ca: Path | None = None,
) -> Listener:
    """
    A listener on C{description}; an C{ssl:} one asks clients for a
    certificate signed by C{client_ca} when C{client_certs} is C{optional}
    or C{required} (see L{sockd.core.tls}).
    """
    # haproxy: is read by our own wrapper (sockd.core.proxy), not Twisted's.
    proxied = _config.is_proxied(description)
    inner = description.split(":", 1)[1] if proxied else description
    parsed = stream_endpoint(reactor, with_backlog(inner, backlog))
    if parsed.tls is not None and client_certs != "none" and client_ca is not None:
        # Imported here: pyOpenSSL only for a daemon that asks for certificates.
        from sockd.core.tls import ask_client_certificates

        ask_client_certificates(parsed.tls, client_certs, client_ca)
    endpoint = parsed.endpoint
    wrapped: IProtocolFactory = factory
    if proxied:
        assert isinstance(factory, GuardedFactory)
        wrapped = ProxyHeaderFactory(factory)

    def adopt(fd: int, family: socket.AddressFamily) -> IListeningPort:
        served: IProtocolFactory = wrapped
        # An ssl: endpoint wraps the factory as it listens; so must we.
        if parsed.tls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            served = TLSMemoryBIOFactory(parsed.tls, False, factory)
        # Annotated as taking a ServerFactory; any protocol factory serves.
        port: IListeningPort = reactor.adoptStreamPort(fd, family, served)  # type: ignore[arg-type]
        return port

    return Listener(
        service, description, lambda: endpoint.listen(wrapped), factory, adopt
    )


def datagram_listener(
    service: str,
    description: str,
    protocol: DatagramProtocol,
    reactor: IDaemonReactor,
    max_packet_size: int,
    reuse_port: bool = False,
) -> Listener:
    """
    With C{reuse_port} (C{[sockd] workers} > 1), a UDP port is bound with
    C{SO_REUSEPORT} and each worker binds its own socket beside it; a socket
    passed by systemd is shared as it is.
    """
    endpoint = parse_datagram(description)
    size = endpoint.max_packet_size or max_packet_size

    def adopt(fd: int, family: socket.AddressFamily) -> IListeningPort:
        port: IListeningPort = reactor.adoptDatagramPort(fd, family, protocol, size)
        return port

    def rebind(host: str, port: int) -> IListeningPort:
        return bind_reusing_port(reactor, protocol, size, endpoint.family, host, port)

    reusing = reuse_port and endpoint.systemd_index is None
    return Listener(
        service,
        description,
        lambda: endpoint.listen(reactor, protocol, max_packet_size, reusing),
        protocol,
        adopt,
        rebind if reusing else None,
    )


def shared_sockets(
    services: Iterable[IService], sections: Collection[str]
) -> list[workers.SharedSocket]:
    """
    (section, description, what) of each bound listener of C{sections}
    among C{services}: what is its descriptor, for a worker to inherit, or
    the (host, port) a worker binds beside it (UDP, see L{datagram_listener}).
    """
    shared: list[workers.SharedSocket] = []
    for child in services:
        if (
            isinstance(child, Listener)
            and child.service in sections
            and child.port is not None
        ):
            address = child.shared_address()
            descriptor = IFileDescriptor(child.port, None)
            if address is not None:
                shared.append((child.service, child.description, address))
            elif descriptor is not None:
                shared.append((child.service, child.description, descriptor.fileno()))
    return shared


def make_daemon_service(
    config: Config,
    builders: Mapping[str, Builder],
    reactor: IDaemonReactor | None = None,
    loader: Callable[[], Config] | None = None,
    overrides: Mapping[str, Mapping[str, str]] | None = None,
    *,
    inherited: Mapping[tuple[str, str], int | tuple[str, int]] | None = None,
) -> MultiService:
    """
    One service holding the listeners each of C{builders} (section ->
    L{Builder}) makes, and the workers C{[sockd] workers} asks for (they
    load the same file with the same C{overrides}).

    In a worker, C{inherited} maps (section, description) to the descriptor
    of the socket the main process bound, or to the (host, port) to bind
    beside it: those are served; no metrics page, no readiness notice and
    no further workers.
    """
    if reactor is None:
        reactor = global_reactor()
    lean_dispatch(reactor)
    sections = list(builders)
    top = MultiService()
    if inherited is None:
        # First: workers inherit the raised limit.
        DescriptorLimit(config, sections).setServiceParent(top)
    for build in builders.values():
        for child in build(config, reactor):
            if inherited is not None:
                assert isinstance(child, Listener)
                fd = inherited.get((child.service, child.description))
                if fd is None:
                    log.warn(
                        "sockd: {service} {description} is not in the main "
                        "process's listeners (the file changed?); not served "
                        "here until a restart",
                        service=child.service,
                        description=child.description,
                    )
                    continue
                if isinstance(fd, int):
                    child.inherit(fd)
                else:
                    child.rebind(*fd)
            child.setServiceParent(top)
    lifecycle = Lifecycle(config, sections, reactor, loader)
    if inherited is not None:
        lifecycle.setServiceParent(top)
        return top
    #: counted on the metrics page beside the listeners' targets
    counted: list[object] = []
    if config.sockd.workers > 1:
        shared = workers.shareable(sections)
        if len(shared) < len(sections):
            log.info(
                "sockd: chat is served by the main process only: its members "
                "and rooms live in one process{more}",
                more="" if shared else "; no worker started",
            )
        if shared:
            supervisor = workers.Workers(
                config.sockd.workers - 1,
                {
                    "config": os.path.abspath(config.source),
                    "overrides": {k: dict(v) for k, v in (overrides or {}).items()},
                    "sections": shared,
                    "metrics": config.metrics.enabled,
                },
                reactor,
                grace=config.sockd.shutdown_grace + config.sockd.abort_grace + 5,
                sockets=lambda: shared_sockets(top, shared),
            )
            supervisor.setServiceParent(top)
            counted.append(supervisor)
    if config.metrics.enabled:
        # Only when asked for: prometheus_client and twisted.web take time
        # to import, at every start.
        from twisted.web.server import Site

        import sockd.core.metrics as metrics

        collector = metrics.SockdCollector(
            lambda: [target for _, target in lifecycle.targets()] + counted, reactor
        )
        site = Site(
            metrics.resource(collector), timeout=metrics.IDLE_TIMEOUT, reactor=reactor
        )
        site.noisy = False
        capped = metrics.CappedFactory(
            site, config.metrics.max_connections, reactor, config.sockd.abort_grace
        )
        for description in config.metrics.listen:
            stream_listener(
                "metrics",
                description,
                capped,  # type: ignore[arg-type]
                reactor,
                config.sockd.backlog,
            ).setServiceParent(top)
    # Before Ready: once systemd hears READY=1 it may send SIGHUP at once
    # (systemctl reload), and without the handler SIGHUP kills the process.
    lifecycle.setServiceParent(top)
    Ready(sections, reactor).setServiceParent(top)
    return top


#: descriptors held whatever the load: standard streams, the log, epoll and
#: the reactor's waker, the sd_notify socket, the file root, and room for
#: modules, certificates and DNS look-ups opened on the way
RESERVED_DESCRIPTORS = 64
#: descriptors one file connection may hold: its socket, and the file sent
#: (or, with writable = true, the directory and temporary file of an upload)
FILE_DESCRIPTORS = {False: 2, True: 3}
#: the main process's pipes to each worker (its stdin, stdout and stderr)
WORKER_PIPES = 3
#: connections to Redis of a chat node with backend = redis
REDIS_CONNECTIONS = 2


def descriptor_budget(config: Config, sections: Sequence[str]) -> list[tuple[str, int]]:
    """
    The descriptors one process may hold at once when every cap is reached,
    as (what, how many), naming the key that sets each.  Workers hold no
    more than the main process: the same caps, no metrics page, no pipes.
    """
    return [(what, count) for what, count, _ in _budget(config, sections)]


def _budget(
    config: Config, sections: Sequence[str]
) -> list[tuple[str, int, str | None]]:
    """L{descriptor_budget}, each with the connection cap to lower, if any."""
    listeners = 0
    for section in sections:
        settings = getattr(config, section)
        listeners += len(settings.listen) + len(getattr(settings, "listen_udp", ()))
    budget: list[tuple[str, int, str | None]] = [
        ("reserve", RESERVED_DESCRIPTORS, None)
    ]
    if "echo" in sections and config.echo.listen:
        cap = "[echo] max_connections"
        budget.append((cap, config.echo.max_connections, cap))
    if "file" in sections and config.file.listen:
        each = FILE_DESCRIPTORS[config.file.writable]
        cap = "[file] max_connections"
        budget.append((f"{cap} x {each}", config.file.max_connections * each, cap))
    if config.metrics.enabled:
        listeners += len(config.metrics.listen)
        cap = "[metrics] max_connections"
        budget.append((cap, config.metrics.max_connections, cap))
    if "chat" in sections and config.chat.backend == "redis":
        budget.append(("redis", REDIS_CONNECTIONS, None))
    if config.sockd.workers > 1 and {"echo", "file"} & set(sections):
        pipes = WORKER_PIPES * (config.sockd.workers - 1)
        budget.append(("[sockd] workers' pipes", pipes, None))
    budget.append(("listeners", listeners, None))
    return budget


@implementer(IReconfigurable)
class DescriptorLimit(Service):
    """
    Started first, in the main process: raises the soft limit on open
    descriptors (C{RLIMIT_NOFILE}) to the hard one, and warns when the caps
    of the services (L{descriptor_budget}) can add up to more, naming the
    keys to lower: past the limit, C{accept()} and C{open()} fail with
    C{EMFILE} for clients within the caps.  Checked again on reload.
    """

    #: the limit in force once raised; None: no limit
    limit: int | None = None

    def __init__(
        self,
        config: Config,
        sections: Sequence[str],
        getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
        setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
    ) -> None:
        self.config = config
        self.sections = list(sections)
        self.getrlimit = getrlimit
        self.setrlimit = setrlimit
        self._raised = False
        self.setName("descriptors")

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._start()

    def startService(self) -> None:
        super().startService()
        self._start()

    def _start(self) -> None:
        if self._raised:
            return
        self._raised = True
        self.limit = self.raise_limit()
        self.check(self.config)

    def raise_limit(self) -> int | None:
        """Raise the soft limit to the hard one; return the limit in force."""
        soft, hard = self.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return None
        # Linux allows no infinite descriptor limit: keep the soft one then.
        if hard == resource.RLIM_INFINITY or soft >= hard:
            return soft
        try:
            self.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            # A sandbox (seccomp, a container) may forbid it.
            log.info(
                "sockd: could not raise the open files limit from {soft} to "
                "{hard}: {error}",
                soft=soft,
                hard=hard,
                error=e,
            )
            return soft
        log.info(
            "sockd: open files limit raised from {soft} to {hard}",
            soft=soft,
            hard=hard,
        )
        return hard

    def check(self, config: Config) -> bool:
        """Warn if C{config}'s caps can need more than the limit; False then."""
        budget = _budget(config, self.sections)
        needed = sum(count for _, count, _ in budget)
        if self.limit is None or needed <= self.limit:
            return True
        keys = [key for _, _, key in budget if key is not None]
        log.warn(
            "sockd: the connection caps can need {needed} open files "
            "({parts}) but this process may open {limit} (RLIMIT_NOFILE): "
            "past it, clients within the caps fail (EMFILE) instead of being "
            "refused with a message; lower {keys}, or raise the limit "
            "(LimitNOFILE= in the systemd unit, ulimit -n before starting)",
            needed=needed,
            parts=", ".join(f"{what} {count}" for what, count, _ in budget),
            limit=self.limit,
            keys=" or ".join(keys),
        )
        return False

    def reconfigure(self, config: Config) -> None:
        """A reload: check the new caps against the limit."""
        self.config = config
        self.check(config)


class Lifecycle(Service):
    """
    Graceful stop and reload for every service in the tree.

     - Stopping (SIGTERM): each listener's factory that is L{IDrainable} is
       asked to let work in flight finish, for up to C{shutdown_grace}.
     - SIGHUP: C{loader} reads the configuration again; each listener's
       factory or datagram protocol, then each service beside this one,
       that is L{IReconfigurable} gets it.  An invalid file is logged and
       ignored.
     - At start and on each reload, every L{GuardedFactory} gets the
       C{[sockd]} settings its connections use (the TLS handshake timeout),
       and every L{IAccessControlled} listener its section's C{allow},
       C{deny} and C{trusted_proxies}.
    """

    def __init__(
        self,
        config: Config,
        sections: Sequence[str],
        reactor: IReactorFromThreads,
        loader: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.sections = list(sections)
        self.reactor = reactor
        self.loader = loader
        self._previous: _Handler = None
        self.setName("lifecycle")

    def targets(self) -> list[tuple[str, object]]:
        """(section, factory or protocol) for each listener, once each."""
        seen: dict[int, tuple[str, object]] = {}
        for child in self.parent or ():
            if isinstance(child, Listener) and child.target is not None:
                seen.setdefault(id(child.target), (child.service, child.target))
        return list(seen.values())

    def _share(self, config: Config) -> None:
        for section, target in self.targets():
            if isinstance(target, GuardedFactory):
                target.handshake_timeout = config.sockd.tls_handshake_timeout
            controlled = IAccessControlled(target, None)
            if controlled is not None:
                allow, deny, trusted = _config.access_of(config, section)
                controlled.set_access(AccessList(allow, deny), AccessList(trusted))

    def startService(self) -> None:
        super().startService()
        self._share(self.config)
        if self.loader is not None and threading.current_thread() is (
            threading.main_thread()
        ):
            self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        # Signal handlers run between bytecodes: hand over to the reactor.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Read the configuration again and apply it; False if invalid."""
        assert self.loader is not None
        try:
            new = self.loader()
        except ConfigError as e:
            log.error(
                "sockd: reload refused, running settings kept: {error}", error=str(e)
            )
            return False
        for section, target in self.targets():
            old_settings = getattr(self.config, section)
            new_settings = getattr(new, section)
            for key in ("listen", "listen_udp", "enabled", "client_certs", "client_ca"):
                if getattr(old_settings, key, None) != getattr(new_settings, key, None):
                    log.warn(
                        "sockd: [{section}] {key} changed; it applies at the "
                        "next restart",
                        section=section,
                        key=key,
                    )
            reconfigurable = IReconfigurable(target, None)
            if reconfigurable is not None:
                reconfigurable.reconfigure(new)
        self._share(new)
        self.config = new
        log.info("sockd: configuration reloaded from {source}", source=new.source)
        for sibling in self.parent or ():
            reconfigurable = IReconfigurable(sibling, None)
            if reconfigurable is not None:
                reconfigurable.reconfigure(new)
        return True

    def stopService(self) -> Deferred[list[None]] | None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        grace = self.config.sockd.shutdown_grace
        waits = [
            drainable.drain(grace)
            for drainable in (IDrainable(t, None) for _, t in self.targets())
            if drainable is not None
        ]
        if not waits:
            return None
        log.info(
            "sockd: stopping; letting work in flight finish (up to {grace}s)",
            grace=grace,
        )
        return gatherResults(waits)


class Ready(Service):
    """
    Started last: every listener is bound.  Says so, once, in the log and
    to systemd (C{READY=1} and a C{STATUS=} summary, see L{sockd.core.notify}),
    then pings the watchdog if systemd asks; C{STOPPING=1} when stopped.
    """

    notifier: Notifier | None = None

    def __init__(
        self,
        sections: Sequence[str],
        reactor: IReactorTime | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.sections = list(sections)
        self.reactor = reactor
        self.environ = environ
        self.setName("ready")

    def startService(self) -> None:
        super().startService()
        reactor = self.reactor
        # twistd starts the services before the reactor runs, and installs
        # its SIGTERM handler only then: a stop sent as soon as "ready" was
        # said would kill the daemon without a drain.  So say it once the
        # reactor runs.
        if IReactorCore.providedBy(reactor) and not getattr(reactor, "running", True):
            reactor.callWhenRunning(self._announce)
        else:
            self._announce()

    def _announce(self) -> None:
        if not self.running:
            return  # stopped before the reactor ran
        log.info("sockd: ready: {services}", services=" ".join(self.sections))
        clock = self.reactor if IReactorTime.providedBy(self.reactor) else None
        environ = os.environ if self.environ is None else self.environ
        self.notifier = Notifier(environ, clock)
        self.notifier.ready(self.summary())
        self.notifier.start_watchdog()

    def summary(self) -> str:
        """One line: each service and where it listens."""
        where: dict[str, list[str]] = {s: [] for s in self.sections}
        for child in self.parent or ():
            if isinstance(child, Listener) and child.port is not None:
                kind, spot = child.where()
                where.setdefault(child.service, []).append(f"{kind} {spot}")
        return "; ".join(
            f"{service}: {', '.join(spots) or 'no listener'}"
            for service, spots in where.items()
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.notifier is not None:
            self.notifier.stopping()
            self.notifier.close()
            self.notifier = None
        return None


def _list_option(key: str, doc: str) -> Callable[[DaemonOptions, str], None]:
    """The handler of an option giving one value of the list C{key}."""

    def add(self: DaemonOptions, value: str) -> None:
        self._add_list(key, value)

    add.__doc__ = doc
    return add


class DaemonOptions(usage.Options):
    """
    Options every daemon shares: which INI file, and C{--set} overrides.
    A subclass names its C{section}; each key of it with an option's help
    (see L{sockd.core.config.setting}) becomes an option overriding it:
    C{--max-connections} for C{max_connections}, a flag for a flag, an
    option given once per value for a list.
    """

    section = ""

    optParameters: list[list[Any]] = [
        [
            "config",
            "c",
            None,
            "INI file (default: $SOCKD_CONFIG, "
            f"{_config.SYSTEM_CONFIG}, then the packaged default)",
        ],
    ]
    optFlags: list[list[Any]] = []
    #: option name -> the key of C{section} it sets, and how
    keyOptions: dict[str, tuple[str, _config.Key]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "section" not in cls.__dict__ or not cls.section:
            return
        # usage.Options gathers these lists from every class of the MRO.
        cls.optParameters = list(cls.__dict__.get("optParameters", []))
        cls.optFlags = list(cls.__dict__.get("optFlags", []))
        cls.keyOptions = {}
        for key, spec in _config.SCHEMA[cls.section].items():
            if not spec.doc:
                continue
            option = key.replace("_", "-")
            if spec.many:
                # A method: usage.Options calls it once per occurrence.
                add = _list_option(key, spec.doc)
                setattr(cls, f"opt_{key}", add)
                if spec.short:
                    setattr(cls, f"opt_{spec.short}", add)
                continue
            if spec.flag:
                cls.optFlags.append([option, spec.short, spec.doc])
            else:
                cls.optParameters.append([option, spec.short, None, spec.doc])
            cls.keyOptions[option] = (key, spec)

    def __init__(self) -> None:
        super().__init__()
        self.overrides: dict[str, dict[str, str]] = {}
        self.lists: dict[str, list[str]] = {}

    def opt_set(self, assignment: str) -> None:
        """Override one setting: KEY=VALUE, or SECTION.KEY=VALUE."""
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise usage.UsageError(f"--set expects KEY=VALUE, not {assignment!r}")
        section, dot, name = key.strip().rpartition(".")
        if not dot:
            section = self.section
        if not section:
            raise usage.UsageError(f"--set expects SECTION.KEY=VALUE, not {key!r}")
        self.overrides.setdefault(section.lower(), {})[name.lower()] = value

    def load(self) -> Config:
        """Read the configuration these options name (again, on SIGHUP)."""
        # A single daemon reads its own section: the others may name
        # sockets, mounts and credentials of other units.
        runs = (self.section,) if self.section else None
        return _config.load(self["config"], self.overrides, runs=runs)

    def make_service(
        self, builders: Mapping[str, Builder], reactor: IDaemonReactor | None = None
    ) -> MultiService:
        """
        L{make_daemon_service} for these options: reloads and workers read
        the same file with the same overrides.
        """
        return make_daemon_service(
            self.config,
            builders,
            reactor,
            loader=self.load,
            overrides=self.overrides,
        )

    def _add_list(self, key: str, value: str) -> None:
        self.lists.setdefault(key, []).append(value)

    def postOptions(self) -> None:
        parent = getattr(self, "parent", None)
        if parent is not None:
            # Under systemd, journald stamps each line: twistd should not.
            prefer_journal(parent, os.environ)
        # Options win over --set, whatever their order.
        for option, (key, spec) in self.keyOptions.items():
            value = self[option]
            if spec.flag:
                value = "true" if value else None
            if value is not None:
                self.overrides.setdefault(self.section, {})[key] = value
        for key, values in self.lists.items():
            self.overrides.setdefault(self.section, {})[key] = " ".join(values)
        if self.section:
            # Running a single daemon means running it, whatever the file says.
            self.overrides.setdefault(self.section, {}).setdefault("enabled", "true")
        try:
            self.config = self.load()
        except ConfigError as e:
            # Not a usage error: say what is wrong without the options list.
            raise SystemExit(f"sockd: {e}") from None
